"""Export a checkpoint to a Hugging Face folder that transformers loads offline.

    fasttrain export runs/demo --hf exported/demo
    >>> AutoModelForCausalLM.from_pretrained("exported/demo"); AutoTokenizer.from_pretrained("exported/demo")

The model is GPT-2 (GPT2LMHeadModel) with exactly our function: exact-erf GELU (activation "gelu", not
GPT-2's tanh "gelu_new"), LayerNorm eps 1e-5, 1/sqrt(head_dim) attention scaling, tied input/output
embeddings, no dropout. Our nn.Linear weights are (out, in); GPT-2's Conv1D stores (in, out), so every
projection is transposed. The folder holds config.json, model.safetensors (the tied output head is not
stored twice), and the dataset's byte-level BPE as a PreTrainedTokenizerFast (tokenizer.json plus
tokenizer_config.json) whose bos/eos token is the end-of-text token. Needs the `hf` extra (transformers).
"""
from __future__ import annotations

import json
import os

import torch

from fasttrain.checkpoint.model import load_checkpoint
from fasttrain.data.dataset import open_dataset
from fasttrain.model import GPT

_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("exporting to Hugging Face needs transformers: pip install 'fasttrain-repeat[hf]'") from None
    return transformers


def hf_state_dict(model: GPT, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Our parameters under GPT2LMHeadModel's names, Conv1D weights transposed (contiguous, on the CPU)."""
    out = {}
    for name, tensor in model.state_dict().items():
        hf_name = name.replace("blocks.", "h.")
        if name.endswith(_TRANSPOSED):
            tensor = tensor.t()
        out["transformer." + hf_name] = tensor.detach().to("cpu", dtype).contiguous()
    return out


def hf_config(model: GPT, eot_id: int | None = None, dtype: torch.dtype = torch.float32):
    transformers = _transformers()
    config = transformers.GPT2Config(
        vocab_size=model.vocab_size,
        n_positions=model.context_length,
        n_embd=model.d_model,
        n_layer=model.n_layer,
        n_head=model.n_head,
        n_inner=4 * model.d_model,
        activation_function="gelu",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False,
        reorder_and_upcast_attn=False,
        tie_word_embeddings=True,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
    )
    config.architectures = ["GPT2LMHeadModel"]
    if int(transformers.__version__.split(".")[0]) >= 5:  # the field was renamed in transformers 5
        config.dtype = dtype
    else:
        config.torch_dtype = dtype
    return config


def hf_tokenizer(tokenizer, eot_id: int | None, context_length: int, **kwargs):
    """A tokenizers.Tokenizer as a transformers PreTrainedTokenizerFast whose bos/eos token is end-of-text."""
    eot = tokenizer.id_to_token(eot_id) if eot_id is not None else None
    return _transformers().PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=eot, eos_token=eot,
                                                   model_max_length=context_length, **kwargs)


def export_hf(model: GPT, out_dir: str, tokenizer=None, eot_id: int | None = None,
              dtype: torch.dtype = torch.float32) -> str:
    """Write config.json, model.safetensors and (given a tokenizers.Tokenizer) the tokenizer to out_dir."""
    _transformers()  # the one-line error before anything is written
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    hf_config(model, eot_id, dtype).save_pretrained(out_dir)
    save_file(hf_state_dict(model, dtype), os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        hf_tokenizer(tokenizer, eot_id, model.context_length).save_pretrained(out_dir)
        # transformers 5 records its new class name; the old one loads in 4.x and 5 alike.
        config_path = os.path.join(out_dir, "tokenizer_config.json")
        with open(config_path) as f:
            tokenizer_config = json.load(f)
        tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
        with open(config_path, "w") as f:
            json.dump(tokenizer_config, f, indent=2)
    return out_dir


def export_checkpoint(path: str, out_dir: str, dataset_path: str | None = None, config=None,
                      dtype: torch.dtype = torch.float32) -> str:
    """A checkpoint (.pt or run folder) -> a Hugging Face folder with the dataset's tokenizer."""
    _transformers()  # fail before loading anything large
    loaded = load_checkpoint(path, "cpu", config)
    dataset_path = dataset_path or loaded.config.data.path
    if not dataset_path:
        raise ValueError(f"{loaded.path}: its config names no dataset to take the tokenizer from: pass --dataset")
    dataset = open_dataset(dataset_path, verify=False)  # only the tokenizer is read
    if dataset.vocab_size > loaded.model.vocab_size:
        raise ValueError(f"the tokenizer of {dataset_path} has {dataset.vocab_size} tokens, more than the model's "
                         f"{loaded.model.vocab_size}: pass the dataset the model was trained on (--dataset)")
    return export_hf(loaded.model, out_dir, dataset.tokenizer, dataset.eot_id, dtype)
