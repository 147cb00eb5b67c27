"""The training loop and its components: optimizer, schedule, checkpoints, metrics, distributed."""
