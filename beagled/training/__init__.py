"""Training: the daemon-side runner and the subprocess workers of each backend (mlx, unsloth, peft)."""
