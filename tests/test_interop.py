"""TransformerLens: a HookedTransformer built from our weights computes our function, and the README's
induction-head analysis on it gives fasttrain's own prefix-matching scores."""
import contextlib
import io
import os
import re

import pytest
import torch
import transformer_lens  # in the test extra: a missing or broken install must fail, not skip

from fasttrain.checkpoint.files import save_checkpoint
from fasttrain.config import config_from_dict
from fasttrain.data import open_dataset
from fasttrain.interop import hooked_state_dict, to_hooked_transformer
from fasttrain.measure.prefix_matching import induction_scores
from fasttrain.model import GPT
from test_eval_induction import induction_model
from test_export import random_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def save_run(run_dir, model, data_path):
    """A run folder holding `model` as its newest checkpoint, as the trainer leaves one."""
    cfg = config_from_dict({"model": {"n_layer": model.n_layer, "d_model": model.d_model, "n_head": model.n_head,
                                      "context_length": model.context_length, "vocab_size": model.vocab_size},
                            "data": {"path": data_path}, "optim": {"warmup_steps": 1}, "train": {"steps": 2}})
    os.makedirs(run_dir)
    cfg.save(os.path.join(run_dir, "config.yaml"))
    save_checkpoint(run_dir, 2, {"model": model.state_dict(), "optimizer": {}, "step": 2, "rng": {},
                                 "config": cfg.to_dict(), "vocab_size": model.vocab_size})
    return run_dir


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return random_weights(GPT(n_layer=2, d_model=48, n_head=3, vocab_size=320, context_length=64))


def test_state_dict_layout():
    model = GPT(n_layer=1, d_model=16, n_head=2, vocab_size=50, context_length=8)
    sd = hooked_state_dict(model)
    assert sd["blocks.0.attn.W_Q"].shape == (2, 16, 8) and sd["blocks.0.attn.b_K"].shape == (2, 8)
    assert sd["blocks.0.attn.W_O"].shape == (2, 8, 16) and sd["blocks.0.mlp.W_in"].shape == (16, 64)
    # head 1's keys are rows 16 + 8 .. 16 + 16 of c_attn, read as x @ W
    assert torch.equal(sd["blocks.0.attn.W_K"][1], model.blocks[0].attn.c_attn.weight[24:32].t())
    assert torch.equal(sd["unembed.W_U"], model.wte.weight.t()) and not sd["unembed.b_U"].any()


def test_hooked_transformer_gives_our_logits_and_attention(model):
    hooked = to_hooked_transformer(model)
    assert isinstance(hooked, transformer_lens.HookedTransformer)
    assert hooked.cfg.act_fn == "gelu" and hooked.cfg.normalization_type == "LN" and hooked.cfg.eps == 1e-5
    idx = torch.randint(0, 320, (3, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, probs = model.attention_probs(idx)
        theirs, cache = hooked.run_with_cache(idx)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cache.stack_activation("pattern"), torch.stack(probs), atol=1e-5, rtol=1e-5)


def test_processed_weights_keep_the_function(model):
    idx = torch.randint(0, 320, (2, 64), generator=torch.Generator().manual_seed(2))
    folded = to_hooked_transformer(model, fold_ln=True, center_writing_weights=True, fold_value_biases=True)
    centered = to_hooked_transformer(model, fold_ln=True, center_writing_weights=True, fold_value_biases=True,
                                     center_unembed=True)
    with torch.no_grad():
        ours = model(idx)
        torch.testing.assert_close(folded(idx), ours, atol=1e-4, rtol=1e-4)
        shifted = centered(idx)
    assert not torch.allclose(shifted, ours, atol=1e-2)  # W_U centered: logits move by a constant per position
    torch.testing.assert_close(shifted.log_softmax(-1), ours.log_softmax(-1), atol=1e-4, rtol=1e-4)


def test_run_folder_converts_with_its_tokenizer(model, dataset_dir, tmp_path):
    run = save_run(str(tmp_path / "run"), model, dataset_dir)
    hooked = to_hooked_transformer(run)
    text = "The cat sat on the mat."
    dataset = open_dataset(dataset_dir)
    ids = hooked.to_tokens(text)
    assert ids[0].tolist() == [dataset.eot_id] + dataset.tokenizer.encode(text).ids
    with torch.no_grad():
        torch.testing.assert_close(hooked(ids), model(ids), atol=1e-4, rtol=1e-4)


def readme_block(marker: str) -> str:
    """The README's ```python block that contains `marker`."""
    blocks = re.findall(r"```python\n(.*?)```", open(os.path.join(ROOT, "README.md")).read(), re.S)
    (block,) = [b for b in blocks if marker in b]
    return block


def test_readme_induction_analysis_gives_fasttrain_scores(dataset_dir, tmp_path):
    dataset = open_dataset(dataset_dir)
    V = dataset.vocab_size
    # "repeated": a hand-set induction circuit (layer 1, head 0 copies what followed the current token);
    # "baseline": random weights
    circuit = induction_model(V=V, T=128).cpu()
    torch.manual_seed(0)
    baseline = random_weights(GPT(n_layer=2, d_model=48, n_head=3, vocab_size=V, context_length=128))
    runs = {"repeated": save_run(str(tmp_path / "repeated"), circuit, dataset_dir),
            "baseline": save_run(str(tmp_path / "baseline"), baseline, dataset_dir)}
    code = readme_block("to_hooked_transformer(run)")
    for placeholder, path in (("sweeps/main/runs/3m_f0.1_E100_uniform_s0", runs["repeated"]),
                              ("sweeps/main/runs/3m_f0_s0", runs["baseline"]), ("data/default", dataset_dir)):
        assert f'"{placeholder}"' in code
        code = code.replace(f'"{placeholder}"', repr(path))
    namespace, printed = {}, io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            exec(compile(code, "README.md", "exec"), namespace)
    finally:
        torch.set_grad_enabled(True)
    for name, model in (("repeated", circuit), ("baseline", baseline)):
        expected = induction_scores(model, dataset)["induction_scores"]
        torch.testing.assert_close(namespace["scores"][name], torch.tensor(expected), atol=1e-5, rtol=1e-5)
    assert namespace["scores"]["repeated"][1, 0] > 0.99 and namespace["scores"]["baseline"].max() < 0.5
    loss, ablated = namespace["losses"]["repeated"]
    assert loss < 0.1 and ablated > loss + 1.0  # the circuit predicts the repeats; without its head it cannot
    assert "repeated: best head L1H0, prefix matching 1.000" in printed.getvalue()


def test_bad_input_gives_one_line(model, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        to_hooked_transformer(str(tmp_path / "empty"))
    assert str(e.value) == (f"{tmp_path / 'empty'}: holds no checkpoints (expected "
                            f"{tmp_path / 'empty' / 'checkpoints' / 'step_*.pt'}); train it first or pass a .pt file")
    monkeypatch.setitem(__import__("sys").modules, "transformer_lens", None)  # `import transformer_lens` fails
    with pytest.raises(ImportError) as e:
        to_hooked_transformer(model)
    assert str(e.value) == ("converting to TransformerLens needs transformer-lens: "
                            "pip install 'fasttrain-repeat[lens]'")
