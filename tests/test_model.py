import pytest
import torch
import torch.nn.functional as F

from fasttrain.ladder import PRESETS, non_embedding_params
import fasttrain.model as model_module
from fasttrain.model import GPT, auto_attention, causal_attention, resolve_attention


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_match_their_nominal_size(name):
    p = PRESETS[name]
    with torch.device("meta"):  # no memory: the 800m model is counted, not allocated
        model = GPT(p.n_layer, p.d_model, p.n_head, vocab_size=8192, context_length=p.context_length)
    n = model.num_params(non_embedding=True)
    assert n == non_embedding_params(p.n_layer, p.d_model)
    assert abs(n - p.nominal_params) <= 0.10 * p.nominal_params
    assert model.num_params(non_embedding=False) == n + p.d_model * (8192 + p.context_length)
    assert p.d_model // p.n_head in (16, 32, 64, 128)


def test_ladder_is_geometric_and_spans_1m_to_800m():
    sizes = [non_embedding_params(p.n_layer, p.d_model) for p in PRESETS.values()]
    assert sizes == sorted(sizes)
    assert sizes[0] < 1.5e6 and 7.5e8 < sizes[-1] < 8.5e8
    assert all(1.25 < b / a < 4.5 for a, b in zip(sizes, sizes[1:]))


def tiny(**kw):
    torch.manual_seed(0)
    return GPT(n_layer=2, d_model=32, n_head=2, vocab_size=97, context_length=64, **kw)


def test_loss_matches_logits_and_reductions():
    model = tiny()
    x = torch.randint(0, 97, (3, 20))
    y = torch.randint(0, 97, (3, 20))
    y[0, :5] = -100
    logits = model(x)
    assert logits.shape == (3, 20, 97)
    ref = F.cross_entropy(logits.view(-1, 97), y.view(-1), reduction="none").view(3, 20)
    torch.testing.assert_close(model(x, y, reduction="none"), ref)
    torch.testing.assert_close(model(x, y), ref.sum() / (y != -100).sum())
    torch.testing.assert_close(model(x, y, reduction="sum"), ref.sum())


def test_causality_and_attention_probs():
    model = tiny()
    x = torch.randint(0, 97, (2, 16))
    x2 = x.clone()
    x2[:, 10:] = (x2[:, 10:] + 1) % 97
    torch.testing.assert_close(model(x)[:, :10], model(x2)[:, :10])  # the future never leaks
    logits, probs = model.attention_probs(x)
    torch.testing.assert_close(logits, model(x), rtol=1e-5, atol=1e-5)
    assert len(probs) == 2 and probs[0].shape == (2, 2, 16, 16)
    torch.testing.assert_close(probs[0].sum(-1), torch.ones(2, 2, 16))
    assert probs[0].triu(1).abs().max() == 0


def test_output_head_is_tied_and_context_is_enforced():
    model = tiny()
    assert model.num_params(non_embedding=False) == sum(p.numel() for p in model.parameters())
    # Every (vocab, d_model) weight in the state dict (an output head, however named) is the embedding itself.
    wte = model.wte.weight
    heads = {k: v for k, v in model.state_dict().items() if v.shape == wte.shape}
    assert heads and all(v.data_ptr() == wte.data_ptr() for v in heads.values()), list(heads)

    def head_matches_embedding():
        # The logits are the final hidden states times the token embedding, and nothing else.
        x = torch.randint(0, 97, (2, 12))
        with torch.no_grad():
            return torch.allclose(model(x), model.hidden_states(x) @ model.wte.weight.T, rtol=1e-5, atol=1e-6)

    assert head_matches_embedding()
    # The head's gradient reaches the embedding: rows of tokens absent from the input get one through it alone.
    x = torch.randint(0, 50, (2, 12))
    y = torch.randint(0, 97, (2, 12))
    model(x, y).backward()
    assert model.wte.weight.grad[50:].abs().sum() > 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):  # after steps that change the embedding, the head still equals it
        optimizer.step()
        optimizer.zero_grad()
        model(x, y).backward()
    assert head_matches_embedding()
    with pytest.raises(ValueError, match="context length"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_flash_backend_missing_is_a_clear_error():
    try:
        import flash_attn  # noqa: F401
        pytest.skip("flash-attn is installed")  # optional: the error is what a machine without it gets
    except ImportError:
        pass
    model = tiny(attention="flash")
    with pytest.raises(ImportError, match="flash-attn"):
        model(torch.zeros(1, 8, dtype=torch.long))


def test_cudnn_backend_needs_a_gpu():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="cudnn needs a CUDA GPU"):
        causal_attention(q, q, q, "cudnn")


def test_auto_attention_is_torch_on_a_cpu():
    model = tiny(attention="auto")
    idx = torch.randint(0, 50, (2, 9))
    assert torch.equal(model(idx), tiny(attention="torch")(idx))  # resolved lazily, per call
    resolve_attention(model, batch=2, seq=9, dtype=torch.float32)
    assert {block.attn.backend for block in model.blocks} == {"torch"}


def test_auto_attention_measures_once_per_shape_and_keeps_the_choice(tmp_path, monkeypatch):
    # On a GPU: the fastest of the candidates that run, measured the first time a shape is seen, then read
    # back from the cache file by later processes. The timings and the device are stood in for here.
    monkeypatch.setenv("FASTTRAIN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(model_module, "_AUTO_CHOICES", {})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    measured = []

    def fake_time(backend, batch, heads, seq, head_dim, dtype, device, iters=5):
        measured.append(backend)
        if backend == "flash":
            raise ImportError("flash-attn is not installed")
        return {"cudnn": 2.0, "torch": 3.0, "triton": 1.5}[backend] * (2.0 if backend == "triton" and seq > 1000 else 1)

    monkeypatch.setattr(model_module, "time_attention", fake_time)
    cuda = torch.device("cuda")
    assert auto_attention(4, 16, 512, 64, torch.bfloat16, cuda) == "triton"
    assert auto_attention(4, 16, 2048, 64, torch.bfloat16, cuda) == "cudnn"
    assert sorted(measured) == sorted(model_module.AUTO_ATTENTION_CANDIDATES * 2)
    assert auto_attention(8, 16, 512, 64, torch.bfloat16, cuda) == "triton"  # another batch: same choice
    assert len(measured) == 8
    monkeypatch.setattr(model_module, "_AUTO_CHOICES", {})  # a new process: the file answers
    monkeypatch.setattr(model_module, "time_attention", None)
    assert auto_attention(4, 16, 2048, 64, torch.bfloat16, cuda) == "cudnn"
    assert (tmp_path / "attention_auto.json").exists()
