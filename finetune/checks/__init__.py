"""Checks that read files, installed packages or the machine (the recipe's own checks are in `finetune.recipe`).

- `preflight`: the compatibility check for scaling out (recipe x installed versions x this machine).
- `trl_choices`: the values the installed TRL accepts (loss names), read without importing TRL.
Each stage's own file and package checks are its `check` function (`finetune/stages/<kind>.py`); the data
policy's files are checked by the data layer (`finetune.data.policy_file_problems`).
"""
