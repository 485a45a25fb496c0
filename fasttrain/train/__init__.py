"""Training: one run lifecycle (trainer.py) over three engines: one model, a pack, DeepSpeed ZeRO."""
from fasttrain.train.trainer import REQUEUE_EXIT_CODE, StopRequested, train

__all__ = ["REQUEUE_EXIT_CODE", "StopRequested", "train"]
