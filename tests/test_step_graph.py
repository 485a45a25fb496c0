"""The training step is graph-safe: torch.compile traces the model, its Triton losses included, without a
graph break, and a whole step (forward, backward, clipping, AdamW) waits for the host nowhere, so that a CUDA
graph can capture it (train.cuda_graph). On a CPU the host syncs are found by running the step on fake
tensors, which hold no values: anything that would read one (.item(), bool(tensor), a data-dependent shape)
raises. The capture itself, and its losses against eager steps, are checked on a GPU."""
import importlib
import json
import os

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

from fasttrain.config import config_from_dict
from fasttrain.model import GPT, _restricted_sdpa
from fasttrain.optim import make_optimizer, set_lr
from fasttrain.train.engine import train_step
from fasttrain.train.packed import FlatGradients, PackedGPT

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu_only = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")
VOCAB, SEQ = 96, 16


def _gpt(loss, attention="torch"):
    return GPT(1, 32, 2, VOCAB, SEQ, attention=attention, loss=loss)


def _model(kind, loss):
    """The module a step calls: a GPT, or a PackedGPT of three (the same weights: only the graph matters)."""
    torch.manual_seed(0)
    return _gpt(loss) if kind == "plain" else PackedGPT.from_models([_gpt(loss)] * 3)


def _tokens(kind, batch=4):
    shape = (batch, SEQ + 1) if kind == "plain" else (3, batch, SEQ + 1)
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", ["plain", "packed"])
def test_compiled_model_has_no_graph_break(kind):
    # The Triton losses are registered operators: torch.compile keeps them in its one graph.
    model, tokens = _model(kind, "triton"), _tokens(kind)
    explained = torch._dynamo.explain(model)(tokens[..., :-1], tokens[..., 1:], return_token_losses=True)
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_restricted_sdpa_has_no_graph_break():
    # attention "cudnn" is SDPA under sdpa_kernel([CUDNN_ATTENTION]); the CPU has no cuDNN, so the same
    # restriction is traced with the math kernel.
    from torch.nn.attention import SDPBackend

    q = torch.randn(1, 2, 8, 16)
    explained = torch._dynamo.explain(lambda q: _restricted_sdpa(q, q, q, 0.0, [SDPBackend.MATH]).sin())(q)
    assert explained.graph_break_count == 0


def _fake_step(kind, loss, monkeypatch, clip_fn=None):
    """One whole step (2 micro-batches) of a fresh model on fake tensors, set up as a captured GPU step is:
    capturable fused AdamW with a tensor learning rate, the pack's flat gradients, no target range check
    (which a GPU step skips)."""
    for name in ("fasttrain.kernels.linear_cross_entropy", "fasttrain.train.packed"):
        module = importlib.import_module(name)
        check = module.check_targets
        monkeypatch.setattr(module, "check_targets", lambda t, n, i, validate=True, check=check: check(t, n, i, False))
    cfg = config_from_dict({"model": {"n_layer": 1, "d_model": 32, "n_head": 2, "context_length": SEQ},
                            "optim": {"warmup_steps": 0}, "train": {"steps": 10, "global_batch": 4}})
    with torch.device("meta"):
        model = _model(kind, loss)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to_empty(device="cpu")
        optimizer = make_optimizer(model, cfg, torch.device("cpu"), model_dims=int(kind == "packed"), capturable=True)
        set_lr(optimizer, 1e-3)
        tokens = torch.zeros(_tokens(kind).shape, dtype=torch.long)
        if kind == "plain":
            extra = {}
        else:
            grads = FlatGradients(model.parameters())
            extra = {"clip_fn": grads.clip, "zero_grad": grads.zero_}
        if clip_fn is not None:
            extra["clip_fn"] = clip_fn
        loss_value, grad_norm, rows = train_step(model, optimizer, tokens, 2, None, 1.0, None, **extra,
                                                 autocast_cache=False)
    return loss_value, grad_norm, rows


@pytest.mark.parametrize("loss", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["plain", "packed"])
def test_whole_step_never_waits_for_the_host(kind, loss, monkeypatch):
    loss_value, grad_norm, rows = _fake_step(kind, loss, monkeypatch)
    assert loss_value.shape == grad_norm.shape == (() if kind == "plain" else (3,))
    assert rows.shape == ((4,) if kind == "plain" else (3, 4))


def test_a_host_sync_in_the_step_is_caught(monkeypatch):
    def clip_and_read(parameters, max_norm):  # what a step must not do: read a value on the host
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        return norm if float(norm) < 1e9 else norm

    with pytest.raises(DataDependentOutputException):
        _fake_step("plain", "triton", monkeypatch, clip_fn=clip_and_read)


@gpu_only
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_cuda_graph_step_trains_like_eager_steps(dataset_dir, tmp_path, packed):
    from fasttrain.train.trainer import train

    def run(name, cuda_graph):
        cfgs = []
        for k in range(2 if packed else 1):
            cfgs.append(config_from_dict({
                "model": {"n_layer": 2, "d_model": 32, "n_head": 2, "context_length": 32, "loss": "triton"},
                "data": {"path": dataset_dir, "seq_len": 32, "repeated_fraction": 0.2, "repeat_count": 4, "seed": k},
                "optim": {"lr": 3e-3, "warmup_steps": 3},
                "train": {"steps": 10, "global_batch": 8, "micro_batch": 4, "out_dir": str(tmp_path / name / str(k)),
                          "log_every": 1, "eval_tokens": 1024, "seed": k, "cuda_graph": cuda_graph},
            }))
        train(cfgs if packed else cfgs[0])
        with open(os.path.join(cfgs[-1].train.out_dir, "metrics.jsonl")) as f:
            return [r["loss"] for r in map(json.loads, f) if "loss" in r]

    eager, graphed = run("eager", False), run("graphed", True)
    assert len(graphed) == 10
    assert graphed == pytest.approx(eager, rel=2e-2)  # bf16: the same steps, other reduction orders
    assert graphed[-1] < graphed[0]


def test_captured_optimizer_state_is_a_plain_checkpoint():
    # A capturable AdamW keeps its learning rate in a tensor; its checkpoint holds a float, and loading keeps
    # each optimizer's own implementation, so runs move freely between captured and plain steps.
    from fasttrain.optim import load_optimizer_state, optimizer_state

    cfg = config_from_dict({"model": {"n_layer": 1, "d_model": 32, "n_head": 2, "context_length": SEQ},
                            "optim": {"warmup_steps": 0}, "train": {"steps": 10, "global_batch": 4}})
    torch.manual_seed(0)
    models = [_gpt("torch") for _ in range(3)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    captured = make_optimizer(models[0], cfg, torch.device("cpu"), capturable=True)
    plain = make_optimizer(models[1], cfg, torch.device("cpu"))
    tokens = _tokens("plain")
    for model, optimizer in ((models[0], captured), (models[1], plain)):
        set_lr(optimizer, 3e-3)
        train_step(model, optimizer, tokens, 4, None, 1.0)
    state = optimizer_state(captured)
    assert all(type(g["lr"]) is float and g["lr"] == pytest.approx(3e-3) for g in state["param_groups"])
    assert isinstance(captured.param_groups[0]["lr"], torch.Tensor)  # the optimizer's own is untouched
    fresh = make_optimizer(models[2], cfg, torch.device("cpu"), capturable=True)
    lr_tensor = fresh.param_groups[0]["lr"]
    load_optimizer_state(fresh, optimizer_state(plain))
    assert fresh.param_groups[0]["lr"] is lr_tensor and float(lr_tensor) == pytest.approx(3e-3)
    assert fresh.param_groups[0]["capturable"] and fresh.param_groups[0]["fused"]
    load_optimizer_state(plain, state)
    assert not plain.param_groups[0]["capturable"] and type(plain.param_groups[0]["lr"]) is float
    for p0, p1 in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(captured.state[p0]["exp_avg"], plain.state[p1]["exp_avg"])
