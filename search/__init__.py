"""Evolutionary search over merge recipes (search space, optimizers, trial loop, workers)."""
