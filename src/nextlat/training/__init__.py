"""Training: building a run's components, the loop, optimiser, checkpoints and run folders."""
