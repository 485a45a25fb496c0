"""Our models in other tools' model classes, built in memory from our weights (nothing is downloaded).

    hooked = to_hooked_transformer("runs/3m_f0.1_E100")         # a run folder, a checkpoint file or a GPT
    logits, cache = hooked.run_with_cache(tokens)                 # TransformerLens: logits equal ours

TransformerLens (`pip install 'fasttrain-repeat[lens]'`, imported lazily): a HookedTransformer with our
function, GPT-2's layout in TransformerLens's own names, converted as its GPT-2 weight conversion does:
the fused qkv projection split into W_Q/W_K/W_V (n_heads, d_model, d_head) and b_Q/b_K/b_V (n_heads,
d_head), W_O (n_heads, d_head, d_model), the MLP as W_in (d_model, d_mlp) and W_out (d_mlp, d_model), and
the tied unembedding W_U = W_E^T with b_U = 0. act_fn "gelu" is torch's exact-erf GELU (ours), LayerNorm
eps 1e-5, attention scaled by 1/sqrt(d_head). TransformerLens 3.x deprecates HookedTransformer for removal
in 4.0, so the extra pins 3.x.

By default the weights are loaded unprocessed, so logits and every activation equal ours. TransformerLens's
usual processing is available: fold_ln, center_writing_weights and fold_value_biases leave the logits
unchanged (up to float rounding); center_unembed shifts each position's logits by a constant, leaving the
log-probabilities unchanged.
"""
from __future__ import annotations

import os
import warnings

import torch

from fasttrain.checkpoint.model import load_checkpoint
from fasttrain.config import Config
from fasttrain.data.dataset import open_dataset
from fasttrain.eval.export import hf_tokenizer
from fasttrain.model import GPT


def _transformer_lens():
    try:
        import transformer_lens
    except ImportError:
        raise ImportError("converting to TransformerLens needs transformer-lens: "
                          "pip install 'fasttrain-repeat[lens]'") from None
    return transformer_lens


def hooked_config(model: GPT, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The HookedTransformerConfig of our model: GPT-2's architecture at our sizes."""
    transformer_lens = _transformer_lens()
    return transformer_lens.HookedTransformerConfig(
        n_layers=model.n_layer,
        d_model=model.d_model,
        n_heads=model.n_head,
        d_head=model.d_model // model.n_head,
        d_mlp=4 * model.d_model,
        d_vocab=model.vocab_size,
        n_ctx=model.context_length,
        act_fn="gelu",  # F.gelu, exact erf (GPT-2's own checkpoints use the tanh "gelu_new")
        normalization_type="LN",
        eps=1e-5,
        positional_embedding_type="standard",
        original_architecture="GPT2LMHeadModel",
        init_weights=False,  # every weight comes from ours
        device=str(device),
        dtype=dtype,
    )


def hooked_state_dict(model: GPT, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Our parameters under HookedTransformer's names and shapes. nn.Linear stores (out, in); TransformerLens
    multiplies x @ W, so its matrices are (in, out), per head where they belong to one."""
    H, d = model.n_head, model.d_model
    dh = d // H
    sd = {k: v.detach().to("cpu", dtype) for k, v in model.state_dict().items()}
    out = {"embed.W_E": sd["wte.weight"], "pos_embed.W_pos": sd["wpe.weight"],
           "ln_final.w": sd["ln_f.weight"], "ln_final.b": sd["ln_f.bias"],
           "unembed.W_U": sd["wte.weight"].t(), "unembed.b_U": torch.zeros(model.vocab_size, dtype=dtype)}
    for layer in range(model.n_layer):
        ours = theirs = f"blocks.{layer}."  # the same prefix, different names below it
        out[theirs + "ln1.w"], out[theirs + "ln1.b"] = sd[ours + "ln_1.weight"], sd[ours + "ln_1.bias"]
        out[theirs + "ln2.w"], out[theirs + "ln2.b"] = sd[ours + "ln_2.weight"], sd[ours + "ln_2.bias"]
        # c_attn: rows q | k | v, each head's d_head rows in turn -> (H, d_model, d_head) per projection
        qkv_w = sd[ours + "attn.c_attn.weight"].view(3, H, dh, d).transpose(-1, -2)
        qkv_b = sd[ours + "attn.c_attn.bias"].view(3, H, dh)
        for i, name in enumerate("QKV"):
            out[theirs + f"attn.W_{name}"] = qkv_w[i]
            out[theirs + f"attn.b_{name}"] = qkv_b[i]
        out[theirs + "attn.W_O"] = sd[ours + "attn.c_proj.weight"].t().reshape(H, dh, d)
        out[theirs + "attn.b_O"] = sd[ours + "attn.c_proj.bias"]
        out[theirs + "mlp.W_in"] = sd[ours + "mlp.c_fc.weight"].t()
        out[theirs + "mlp.b_in"] = sd[ours + "mlp.c_fc.bias"]
        out[theirs + "mlp.W_out"] = sd[ours + "mlp.c_proj.weight"].t()
        out[theirs + "mlp.b_out"] = sd[ours + "mlp.c_proj.bias"]
    return {k: v.contiguous() for k, v in out.items()}


def _tokenizer_of(dataset_path: str, context_length: int):
    """The dataset's tokenizer as transformers wants it; BOS (end-of-text) prepended as our sequences start."""
    dataset = open_dataset(dataset_path, verify=False)  # only the tokenizer is read
    return hf_tokenizer(dataset.tokenizer, dataset.eot_id, context_length, add_bos_token=True,
                        name_or_path=os.path.abspath(dataset_path))


def to_hooked_transformer(model_or_run: GPT | str, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32, dataset: str | None = None, fold_ln: bool = False,
                          center_writing_weights: bool = False, center_unembed: bool = False,
                          fold_value_biases: bool = False):
    """A transformer_lens.HookedTransformer with the weights of `model_or_run` (a GPT, a checkpoint file or a
    run folder: its newest checkpoint), in eval mode on `device`.

    The tokenizer (for `to_tokens`, `to_str_tokens`, `generate`) is the dataset's: `dataset`, else the
    dataset of the run's config when that folder exists; without one the model takes token ids only.
    The processing flags are TransformerLens's (see the module docstring); all off, logits equal ours."""
    transformer_lens = _transformer_lens()
    cfg: Config | None = None
    if isinstance(model_or_run, GPT):
        model = model_or_run
    else:
        loaded = load_checkpoint(os.fspath(model_or_run), "cpu")
        model, cfg = loaded.model, loaded.config
    if dataset is None and cfg is not None and cfg.data.path and os.path.isdir(cfg.data.path):
        dataset = cfg.data.path
    tokenizer = _tokenizer_of(dataset, model.context_length) if dataset else None
    with warnings.catch_warnings():  # 3.x announces HookedTransformer's removal in 4.0, which the extra excludes
        warnings.filterwarnings("ignore", message="HookedTransformer is deprecated", category=DeprecationWarning)
        hooked = transformer_lens.HookedTransformer(hooked_config(model, device, dtype), tokenizer=tokenizer)
    state = hooked_state_dict(model, dtype)
    unknown = sorted(set(state) - set(hooked.state_dict()))
    if unknown:  # TransformerLens loads key by key and ignores names it does not have
        raise RuntimeError(f"HookedTransformer has no parameter {unknown[0]}: this transformer-lens version lays "
                           "out GPT-2 differently; install the version the lens extra names")
    hooked.load_and_process_state_dict(state, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                                       center_unembed=center_unembed, fold_value_biases=fold_value_biases)
    return hooked.eval()
