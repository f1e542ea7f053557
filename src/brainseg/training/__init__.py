"""Training: the memory-mapped cache and the trainer."""
