"""The `train` stage: the Trainer, the schedule, flat parameter buffers, checkpoints and the held-out loss."""
