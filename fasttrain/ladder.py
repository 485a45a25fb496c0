"""The model-size ladder: named presets from 100k to 800M non-embedding parameters.

Presets are named by their NON-EMBEDDING parameter count, the unit of Kaplan et al. (2020) and of the
repeated-data paper's fits and "effective sizes". Per block a GPT-2 layer has 12*d^2 + 13*d parameters
(attention 4*d^2 + 4*d, MLP 8*d^2 + 5*d, two LayerNorms 4*d); the embeddings (tokens and positions) are
counted separately because at the small end they outweigh the whole transformer.

Widths and depths follow a geometric ladder (about 2x per rung) with the depth/width ratios of
Kaplan et al.; head_dim is 64 up to 400M and 128 at 800M (faster attention at that width).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    name: str
    n_layer: int
    d_model: int
    n_head: int
    context_length: int = 2048

    @property
    def nominal_params(self) -> float:
        """The size the name promises: '1.5m' -> 1.5e6, '340k' -> 3.4e5."""
        unit = {"k": 1e3, "m": 1e6, "b": 1e9}[self.name[-1]]
        return float(self.name[:-1]) * unit


PRESETS = {
    p.name: p
    for p in [
        Preset("100k", n_layer=2, d_model=64, n_head=2),
        Preset("340k", n_layer=3, d_model=96, n_head=3),
        Preset("900k", n_layer=2, d_model=192, n_head=3),
        Preset("1.5m", n_layer=2, d_model=256, n_head=4),
        Preset("3m", n_layer=4, d_model=256, n_head=4),
        Preset("6m", n_layer=5, d_model=320, n_head=5),
        Preset("13m", n_layer=7, d_model=384, n_head=6),
        Preset("25m", n_layer=8, d_model=512, n_head=8),
        Preset("50m", n_layer=12, d_model=576, n_head=9),
        Preset("85m", n_layer=12, d_model=768, n_head=12),
        Preset("150m", n_layer=16, d_model=896, n_head=14),
        Preset("300m", n_layer=24, d_model=1024, n_head=16),
        Preset("400m", n_layer=20, d_model=1280, n_head=20),
        Preset("800m", n_layer=28, d_model=1536, n_head=12),
    ]
}


def non_embedding_params(n_layer: int, d_model: int) -> int:
    """Closed form of what GPT counts as non-embedding parameters (tested against the real module)."""
    return n_layer * (12 * d_model * d_model + 13 * d_model) + 2 * d_model


def embedding_params(d_model: int, vocab_size: int, context_length: int) -> int:
    return d_model * (vocab_size + context_length)
