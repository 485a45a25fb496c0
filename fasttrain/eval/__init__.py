"""Evaluations of a trained model: the paper's metrics in one document, copying, in-context learning;
Hugging Face export."""
from fasttrain.eval.export import export_checkpoint, export_hf
from fasttrain.eval.run import ALL_METRICS, evaluate, evaluate_checkpoint

__all__ = ["ALL_METRICS", "evaluate", "evaluate_checkpoint", "export_checkpoint", "export_hf"]
