"""Checkpoints, below both the trainer and the evaluations: files (paths, atomic writes, safe reads),
DeepSpeed's format and its consolidated export, and loading a checkpoint as a model."""
from fasttrain.checkpoint.files import CheckpointError
from fasttrain.checkpoint.model import LoadedCheckpoint, load_checkpoint, load_model

__all__ = ["CheckpointError", "LoadedCheckpoint", "load_checkpoint", "load_model"]
