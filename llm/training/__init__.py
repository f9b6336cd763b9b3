"""Training: the loop, checkpoints, optimisers, schedules, logging, ablations."""
