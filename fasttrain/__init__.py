"""fasttrain: train families of GPT models on data with exactly controlled repetition."""
from fasttrain.checkpoint import load_model

__version__ = "0.1.0"
__all__ = ["load_model"]
