"""Wenmai (文脉): fine-tune language models into cultural vertical models from one YAML recipe."""

__version__ = "0.1.0"
