"""Training: the plain single-process trainer, its checkpoints and metrics, and the DeepSpeed path."""
