"""A checkpoint as a model: the GPT of a .pt file or a run folder, with the config it was trained with.

    model, cfg = load_model("runs/demo")          # newest readable checkpoint of a run folder (or a .pt file)
    loaded = load_checkpoint("runs/demo/checkpoints/step_0001000.pt", device="cuda")
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import yaml

from fasttrain.checkpoint.files import CheckpointError, read_newest
from fasttrain.config import Config, ConfigError, config_from_dict, load_config
from fasttrain.model import GPT


@dataclass
class LoadedCheckpoint:
    model: GPT
    config: Config
    step: int | None
    path: str


def _run_config_for(path: str) -> dict | None:
    """config.yaml of the run folder a checkpoint file lives in (run/checkpoints/step_*.pt)."""
    config_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "config.yaml")
    if not os.path.exists(config_path):
        return None
    with open(config_path) as f:
        return yaml.safe_load(f)


_SHAPE_KEYS = ("n_layer", "d_model", "n_head", "context_length")


def _describe(cfg: Config, vocab_size: int) -> str:
    m = cfg.model
    return (f"n_layer={m.n_layer}, d_model={m.d_model}, n_head={m.n_head}, context_length={m.context_length}, "
            f"vocab_size={vocab_size}")


def _saved_config(tree: dict, path: str) -> Config:
    try:
        return config_from_dict(tree, world_size=1)
    except ConfigError as e:
        raise CheckpointError(f"{path}: its saved config is not valid here ({e})") from None


def check_weights(state: dict, model: torch.nn.Module, path: str, against: str, advice: str) -> None:
    """Raise CheckpointError unless `state` holds exactly the model's tensors, in its shapes; the message says
    what the checkpoint was checked `against` and gives the `advice`."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        raise CheckpointError(f"{path} does not match {against}: {k} has shape {tuple(state[k].shape)} in the "
                              f"checkpoint but {tuple(expected[k].shape)} in the model; {advice}")
    if missing or unexpected:
        what = f"lacks {missing[0]}" if missing else f"has an unknown entry {unexpected[0]}"
        raise CheckpointError(f"{path} {what} ({len(missing)} missing, {len(unexpected)} unknown): not a "
                              f"checkpoint of {against}; {advice}")


def load_checkpoint(path: str, device="cpu", config: Config | str | None = None) -> LoadedCheckpoint:
    """Load a checkpoint (.pt file, or a run folder -> its newest readable checkpoint) into a GPT.

    The config comes from `config` (a Config, a YAML/JSON file or a run folder) when given, else from the
    checkpoint, else from the run folder's config.yaml. The model is built with the reference torch
    attention (the same function as the other backends) and the configured loss on a GPU (torch on a CPU),
    and put in eval mode on `device`."""
    ckpt, chosen = read_newest(path)
    saved_tree = ckpt.get("config") or _run_config_for(chosen)
    if config is not None:
        cfg = config if isinstance(config, Config) else load_config(config, world_size=1)
    elif saved_tree is not None:
        cfg = _saved_config(saved_tree, chosen)
    else:
        raise CheckpointError(f"{chosen}: holds no config and no config.yaml lies in its run folder; pass the "
                              "run's config (--config)")
    state = ckpt["model"]
    wte = state.get("wte.weight")
    vocab = cfg.model.vocab_size or ckpt.get("vocab_size") or (wte.shape[0] if wte is not None else None)
    if config is not None and saved_tree is not None:  # n_head changes no shape: compare the configs themselves
        saved = _saved_config(saved_tree, chosen)
        for key in _SHAPE_KEYS:
            mine, theirs = getattr(cfg.model, key), getattr(saved.model, key)
            if mine != theirs:
                raise CheckpointError(f"{chosen} was trained with model.{key}={theirs}, the config given has "
                                      f"model.{key}={mine}: load it with the config it was trained with")
    # SDPA attention everywhere (flash-attn may be absent); the fused loss only on a GPU, where it saves
    # the logits' memory (under the CPU interpreter it would be slow).
    on_gpu = torch.device(device).type == "cuda"
    model_cfg = dataclasses.replace(cfg.model, attention="torch", loss=cfg.model.loss if on_gpu else "torch",
                                    dropout=0.0)
    with torch.device("meta"):  # no random init: every parameter comes from the checkpoint
        model = GPT.from_config(model_cfg, vocab)
    check_weights(state, model, chosen, f"the config ({_describe(cfg, vocab)})",
                  "load it with the config it was trained with")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}  # bf16 exports too
    model.load_state_dict(state, assign=True)
    model.to(device).eval()
    step = ckpt.get("step")
    return LoadedCheckpoint(model=model, config=cfg, step=int(step) if step is not None else None, path=chosen)


def load_model(path: str, device="cpu") -> tuple[GPT, Config]:
    """(model in eval mode, its Config) from a checkpoint .pt file or a run folder (its newest checkpoint)."""
    loaded = load_checkpoint(path, device)
    return loaded.model, loaded.config
