"""fasttrain: train families of GPT models on data with exactly controlled repetition."""

__version__ = "0.1.0"
