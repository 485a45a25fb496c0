"""Evaluations of a trained model: held-out loss, memorization, copying, induction heads; Hugging Face export."""
from fasttrain.eval.export import export_checkpoint, export_hf
from fasttrain.eval.run import ALL_METRICS, CheckpointError, evaluate, evaluate_checkpoint, load_checkpoint, load_model

__all__ = ["ALL_METRICS", "CheckpointError", "evaluate", "evaluate_checkpoint", "export_checkpoint", "export_hf",
           "load_checkpoint", "load_model"]
