"""Evaluation: multiple-choice knowledge tests, the value-alignment suite, gates, and comparisons.

`mc` reads CMMLU/C-Eval/MMLU-style CSV folders and scores answer letters; `suite` and `alignment`
define and run value-alignment probes; `targets` turns `base`, a model folder, a run folder or a
stage folder into a loaded model (through `finetune.model`); `runner` evaluates several of them on
the same suites; `gates` checks thresholds. The `evaluate` stage and `wenmai eval` both call `runner`.
"""
