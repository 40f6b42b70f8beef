"""The GPU engine of gpt-oss: the rollout engine, its kernels, MXFP4 experts, sink attention, expert LoRA."""
