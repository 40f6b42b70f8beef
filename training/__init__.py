"""The parts of a GRPO training run that train_grpo.py puts together (README.md)."""
