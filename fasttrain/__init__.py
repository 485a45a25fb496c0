"""fasttrain: train families of GPT models on data with exactly controlled repetition."""

__version__ = "0.1.0"


def load_model(path, device="cpu"):
    """(model, config) from a checkpoint file or a run folder (its newest complete checkpoint)."""
    from fasttrain.eval.run import load_model as _load_model

    return _load_model(path, device=device)
