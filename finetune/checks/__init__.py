"""Checks that read files, installed packages or the machine (the recipe's own checks are in `finetune.recipe`).

- `preflight`: the compatibility check for scaling out (recipe x installed versions x this machine).
- `trl_choices`: the values the installed TRL accepts (loss names), read without importing TRL.
- `files`: files the recipe names outside its stages (the data policy's lists) exist.
Each stage's own file and package checks are its `check` function (`finetune/stages/<kind>.py`).
"""
