"""Splitting a model over devices: plans, placement and micro-batches."""
