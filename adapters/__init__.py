"""Evaluate, merge and export a trained LoRA adapter (README.md)."""
