"""Hugging Face export: transformers loads the folder offline and gives our logits."""
import argparse
import json
import os
import random

import pytest
import torch
import transformers  # in the test extra: a missing or broken install must fail, not skip

from fasttrain.config import config_from_dict
from fasttrain.data import open_dataset, prepare_dataset
from fasttrain.eval.cli import register
from fasttrain.eval.export import export_hf, hf_state_dict
from fasttrain.model import GPT
from fasttrain.checkpoint.files import save_checkpoint


def random_weights(model, seed=0):
    """Perturb every parameter (LayerNorms and biases included) so a wrong mapping cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 5))) for _ in range(80)]
    docs = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(60)]
    data = str(root / "data")
    prepare_dataset(data, docs, vocab_size=280, test_fraction=0.1, seed=0, progress=False)
    cfg = config_from_dict({"model": {"n_layer": 2, "d_model": 48, "n_head": 3, "context_length": 64},
                            "data": {"path": data}, "optim": {"warmup_steps": 1}, "train": {"steps": 2}})
    torch.manual_seed(0)
    model = random_weights(GPT.from_config(cfg.model, 280))
    run_dir = str(root / "run")
    cfg.save(os.path.join(os.makedirs(run_dir) or run_dir, "config.yaml"))
    save_checkpoint(run_dir, 2, {"model": model.state_dict(), "optimizer": {}, "step": 2, "rng": {},
                                 "config": cfg.to_dict(), "vocab_size": 280})
    return {"root": root, "data": data, "model": model, "run": run_dir}


def test_state_dict_names_and_layout():
    model = GPT(n_layer=1, d_model=16, n_head=2, vocab_size=50, context_length=8)
    sd = hf_state_dict(model)
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == (16, 48)  # Conv1D: (in, out)
    assert torch.equal(sd["transformer.h.0.mlp.c_fc.weight"], model.blocks[0].mlp.c_fc.weight.t())
    assert "lm_head.weight" not in sd  # tied to transformer.wte.weight


def test_exported_model_gives_identical_logits(run):
    out = str(run["root"] / "hf_direct")
    model = run["model"]
    export_hf(model, out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert hf.config.activation_function == "gelu" and hf.config.layer_norm_epsilon == 1e-5
    idx = torch.randint(0, 280, (3, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_export_command_writes_model_and_tokenizer(run):
    out = str(run["root"] / "hf_cli")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export", run["run"], "--hf", out])
    args.func(args)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    assert json.load(open(os.path.join(out, "tokenizer_config.json")))["tokenizer_class"] == "PreTrainedTokenizerFast"
    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    ours = open_dataset(run["data"]).tokenizer
    text = "abc defg hh a"
    assert tok(text)["input_ids"] == ours.encode(text).ids
    assert tok.eos_token == tok.bos_token == "<|endoftext|>" and tok.eos_token_id == 0
    assert json.load(open(os.path.join(out, "config.json")))["eos_token_id"] == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, run["model"](ids), atol=1e-4, rtol=1e-4)
