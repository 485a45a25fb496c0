"""Measurements of a model on its data, the building blocks below both the trainer and the evaluations:
windows and per-token losses, held-out and repeated-subset loss, prefix matching."""
