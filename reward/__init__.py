"""Reward models for Wenmai (multi-dimension heads on a LoRA backbone)."""
