"""Fused attention kernel against a float64 reference: output, log-sum-exp and dq, dk, dv.

On a CPU the kernels run under the Triton interpreter (slow), so the CPU grid is a thinned-out version
of the GPU grid. In fp16/bf16 the error must also stay within 2x the error of PyTorch's own attention
in the same dtype (FlashAttention's test rule). Every output buffer starts as NaN, so an element the
kernels forget to write fails the comparison.
"""
import importlib
import math
import re
import zlib

import pytest
import torch
import torch.nn.functional as F

from fasttrain.kernels.flash_attention import flash_attention

fa = importlib.import_module("fasttrain.kernels.flash_attention")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")

# max|ours - ref| <= ATOL + RTOL * max|ref| for every dtype; in fp16/bf16 also
# max|ours - ref| <= 2 * max|torch_same_dtype - ref| + RULE_ATOL * max|ref| + 1e-5.
TOLERANCES = {  # dtype: (atol, rtol, rule_atol)
    torch.float32: (1e-5, 2e-5, None),
    torch.float16: (1e-3, 4e-3, 5e-4),
    torch.bfloat16: (8e-3, 3e-2, 4e-3),
}


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the kernels fill (out, lse, delta, dq, dk, dv) starts as NaN."""

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(fa, "_empty", nan_empty)


def reference_attention(q, k, v, causal, scale):
    """Plain attention math; called on float64 CPU tensors. Returns (out, lse)."""
    scores = (q @ k.transpose(-2, -1)) * scale
    if causal:
        seq = q.shape[-2]
        scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v, torch.logsumexp(scores, dim=-1)


def random_inputs(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(shape, generator=gen, dtype=torch.float32) for _ in range(4))
    return [t.to(device=DEVICE, dtype=dtype) for t in (q, k, v, do)]


def reference_grads(q, k, v, do, causal, scale):
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    out, _ = reference_attention(q64, k64, v64, causal, scale)
    out.backward(do.cpu().double())
    return out.detach(), q64.grad, k64.grad, v64.grad


def run_attention(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(do)
    return out.detach(), q.grad, k.grad, v.grad


def max_err(x, ref):
    return (x.detach().cpu().double() - ref).abs().max().item()


def assert_close(name, ours, ref, dtype, torch_same_dtype=None):
    atol, rtol, rule_atol = TOLERANCES[dtype]
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert not ours.isnan().any(), f"{name}: NaN (unwritten or invalid elements)"
    scale = ref.abs().max().item()
    err = max_err(ours, ref)
    assert err <= atol + rtol * scale, f"{name}: max error {err:.3g} > {atol + rtol * scale:.3g} (|ref| {scale:.3g})"
    if torch_same_dtype is not None and rule_atol is not None:
        torch_err = max_err(torch_same_dtype, ref)
        bound = 2 * torch_err + rule_atol * scale + 1e-5
        assert err <= bound, f"{name}: max error {err:.3g} > 2 x torch's {torch_err:.3g} + {bound - 2 * torch_err:.3g}"


def case_seed(*parts):
    """A fixed seed per test case (reproducible, different for every case)."""
    return zlib.crc32(repr(parts).encode())


# The full grid runs on a GPU. On a CPU (interpreter) we keep every seq length, causal setting and dtype,
# but only some head_dims per seq length: the interpreter's cost grows with seq^2 and the block count
# (its blocks are 16-32 wide, so seq 17 and 100 already cover partial and ragged blocks for every head_dim).
# T128-d32 is the shape the demo's 100k and 340k models train at.
SEQ_LENS = [1, 17, 100, 128, 300 if ON_GPU else 160]
HEAD_DIMS = [16, 32, 64, 128]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CPU_HEAD_DIMS = {1: (16, 32, 64, 128), 17: (16, 32, 64, 128), 100: (16,), 128: (32, 128), 160: (64,)}
CPU_BF16 = {(17, 32), (100, 16)}  # bf16 in the interpreter runs on upcast tiles: a smoke test of that path


def grid_cases():
    for seq in SEQ_LENS:
        for head_dim in HEAD_DIMS:
            for dtype in DTYPES:
                marks = []
                if not ON_GPU and (head_dim not in CPU_HEAD_DIMS[seq] or
                                   (dtype == torch.bfloat16 and (seq, head_dim) not in CPU_BF16)):
                    marks = [pytest.mark.skip(reason="thinned out under the CPU interpreter")]
                yield pytest.param(seq, head_dim, dtype, marks=marks, id=f"T{seq}-d{head_dim}-{str(dtype)[6:]}")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("seq,head_dim,dtype", list(grid_cases()))
def test_matches_float64_reference(seq, head_dim, dtype, causal):
    batch, heads = (2, 3) if ON_GPU else (1, 2)
    q, k, v, do = random_inputs((batch, heads, seq, head_dim), dtype, case_seed(seq, head_dim, dtype, causal))
    scale = 1.0 / math.sqrt(head_dim)
    ours = run_attention(lambda q, k, v: flash_attention(q, k, v, causal=causal), q, k, v, do)
    ref = reference_grads(q, k, v, do, causal, scale)
    torch_same_dtype = None
    if dtype != torch.float32:
        torch_same_dtype = run_attention(
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal), q, k, v, do)
    for i, name in enumerate(["out", "dq", "dk", "dv"]):
        assert ours[i].dtype == dtype
        assert_close(name, ours[i], ref[i], dtype, None if torch_same_dtype is None else torch_same_dtype[i])


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_log_sum_exp_saved_per_row(causal):
    q, k, v, _ = random_inputs((1, 2, 100, 32), torch.float32, case_seed("lse", causal))
    out, lse = fa._attention_forward(q, k, v, causal, 0.2)
    ref_out, ref_lse = reference_attention(q.cpu().double(), k.cpu().double(), v.cpu().double(), causal, 0.2)
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, 100)
    assert_close("lse", lse, ref_lse, torch.float32)
    assert_close("out", out, ref_out, torch.float32)


def test_custom_softmax_scale():
    q, k, v, do = random_inputs((1, 2, 40, 16), torch.float32, case_seed("scale"))
    ours = run_attention(lambda q, k, v: flash_attention(q, k, v, causal=True, softmax_scale=0.37), q, k, v, do)
    ref = reference_grads(q, k, v, do, True, 0.37)
    for i, name in enumerate(["out", "dq", "dk", "dv"]):
        assert_close(name, ours[i], ref[i], torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_packed_qkv_views(dtype):
    """q, k, v split from one (B, T, 3, H, D) tensor and transposed: strided views, gradient into qkv."""
    batch, seq, heads, head_dim = 2, 50, 2, 32
    gen = torch.Generator().manual_seed(case_seed("qkv", dtype))
    qkv = torch.randn(batch, seq, 3, heads, head_dim, generator=gen).to(DEVICE, dtype).requires_grad_()
    do = torch.randn(batch, heads, seq, head_dim, generator=gen).to(DEVICE, dtype)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=2))
    assert not q.is_contiguous()
    out = flash_attention(q, k, v, causal=True)
    out.backward(do)

    qkv64 = qkv.detach().cpu().double().requires_grad_()
    q64, k64, v64 = (t.transpose(1, 2) for t in qkv64.unbind(dim=2))
    ref, _ = reference_attention(q64, k64, v64, True, 1.0 / math.sqrt(head_dim))
    ref.backward(do.cpu().double())
    assert_close("out", out, ref.detach(), dtype)
    assert_close("dqkv", qkv.grad, qkv64.grad, dtype)


def test_head_dim_not_innermost_and_expanded_grad():
    """q with a strided last dim, and out.sum() whose upstream gradient has all-zero strides."""
    gen = torch.Generator().manual_seed(case_seed("strides"))
    q = torch.randn(1, 2, 64, 33, generator=gen).to(DEVICE)[..., :32].requires_grad_()
    k = torch.randn(1, 2, 32, 64, generator=gen).to(DEVICE).transpose(-1, -2).requires_grad_()
    v = torch.randn(1, 2, 40, 64, generator=gen).to(DEVICE)[:, :, :32, :].transpose(-1, -2).requires_grad_()
    assert q.stride(-2) == 33 and k.stride(-1) == 64 and v.stride(-1) == 64
    flash_attention(q, k, v, causal=False).sum().backward()

    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref, _ = reference_attention(q64, k64, v64, False, 1.0 / math.sqrt(32))
    ref.sum().backward()
    for name, ours, expected in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
        assert_close(name, ours, expected, torch.float32)


def test_fresh_inputs_give_fresh_outputs():
    """Two calls on different inputs of one shape: no state leaks between launches."""
    a = random_inputs((1, 1, 33, 16), torch.float32, 1)[:3]
    b = random_inputs((1, 1, 33, 16), torch.float32, 2)[:3]
    out_a, out_b = flash_attention(*a), flash_attention(*b)
    assert_close("out_b", out_b, reference_attention(*(t.cpu().double() for t in b), True, 0.25)[0], torch.float32)
    assert max_err(out_a, out_b.cpu().double()) > 1e-3


def _t(*shape, dtype=torch.float32, device=DEVICE):
    return torch.randn(shape, dtype=torch.float32).to(device=device, dtype=dtype)


@pytest.mark.parametrize("make_args,message", [
    (lambda: (_t(1, 2, 8, 48), _t(1, 2, 8, 48), _t(1, 2, 8, 48)), "head_dim 48"),
    (lambda: (_t(1, 2, 8, 256), _t(1, 2, 8, 256), _t(1, 2, 8, 256)), "head_dim 256"),
    (lambda: (_t(1, 2, 8, 33), _t(1, 2, 8, 33), _t(1, 2, 8, 33)), "head_dim 33"),
    (lambda: (_t(1, 2, 8, 32), _t(1, 2, 9, 32), _t(1, 2, 9, 32)), "same shape"),
    (lambda: (_t(2, 8, 32), _t(2, 8, 32), _t(2, 8, 32)), "(batch, heads, seq, head_dim)"),
    (lambda: (_t(1, 2, 8, 32), _t(1, 2, 8, 32, dtype=torch.float16), _t(1, 2, 8, 32)), "same dtype"),
    (lambda: (_t(1, 2, 8, 32, dtype=torch.float64),) * 3, "float64 is not supported"),
    (lambda: (_t(1, 2, 8, 32), _t(1, 2, 8, 32, device="meta"), _t(1, 2, 8, 32)), "same device"),
    (lambda: (_t(1, 2, 8, 32, device="cpu").numpy(), _t(1, 2, 8, 32), _t(1, 2, 8, 32)), "torch.Tensor"),
])
def test_bad_inputs_raise_clear_errors(make_args, message):
    with pytest.raises(ValueError, match="flash_attention: .*" + re.escape(message)):
        flash_attention(*make_args())


@pytest.mark.parametrize("kwargs,message", [
    (dict(softmax_scale=-1.0), "softmax_scale"),
    (dict(softmax_scale=float("nan")), "softmax_scale"),
    (dict(causal="yes"), "causal"),
])
def test_bad_options_raise_clear_errors(kwargs, message):
    x = _t(1, 1, 8, 16)
    with pytest.raises(ValueError, match=message):
        flash_attention(x, x, x, **kwargs)


def test_cpu_tensors_without_interpreter_raise(monkeypatch):
    monkeypatch.setattr(fa, "_INTERPRET", False)
    x = _t(1, 1, 8, 16, device="cpu")
    with pytest.raises(ValueError, match="move them to a CUDA GPU"):
        flash_attention(x, x, x)


@gpu_only
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_every_tuning_config(head_dim, causal):
    """Each config the autotuner may pick, on a sequence with a partial last block: bf16 for every config
    (with the atomic dQ; the separate dQ kernel's configs with its own pass), fp16 for the first ones."""
    for dtype in (torch.bfloat16, torch.float16):
        q, k, v, do = random_inputs((2, 2, 300, head_dim), dtype, case_seed("configs", head_dim, causal, dtype))
        scale = 1.0 / math.sqrt(head_dim)
        ref = reference_grads(q, k, v, do, causal, scale)
        for kind in ("fwd", "dkdv", "dq"):
            configs = fa._TUNED_CONFIGS[kind][head_dim <= 64]
            for cfg in configs if dtype == torch.bfloat16 else configs[:1]:
                # The kind under test runs cfg; the other two their first config (no autotuning run).
                forced = {name: [cfg if name == kind else table[head_dim <= 64][0]]
                          for name, table in fa._TUNED_CONFIGS.items()}
                out, lse = fa._attention_forward(q, k, v, causal, scale, configs=forced.get("fwd"))
                dq, dk, dv = fa._attention_backward(do, q, k, v, out, lse, causal, scale,
                                                    dkdv_configs=forced.get("dkdv"), dq_configs=forced.get("dq"),
                                                    mode="separate" if kind == "dq" else "atomic")
                for name, ours, expected in zip(["out", "dq", "dk", "dv"], [out, dq, dk, dv], ref):
                    assert_close(f"{kind} {cfg}: {name}", ours, expected, dtype)


@pytest.mark.parametrize("mode, tma, causal", [("separate", "off", True), ("atomic", "on", True),
                                               ("atomic", "on", False)])
def test_dq_modes_and_tma_loads(monkeypatch, mode, tma, causal):
    """The atomics-free dQ pass, and loads through TMA tensor descriptors (emulated by the interpreter on a
    CPU; on a GPU, "on" uses them wherever the strides allow), against float64: partial last blocks."""
    monkeypatch.setattr(fa, "dq_mode", mode)
    monkeypatch.setattr(fa, "tma", tma)
    q, k, v, do = random_inputs((1, 2, 45, 32), torch.float32, case_seed("modes", mode, tma, causal))
    assert fa._use_tma(q, k, v, do) == (tma == "on")
    ours = run_attention(lambda q, k, v: flash_attention(q, k, v, causal=causal), q, k, v, do)
    ref = reference_grads(q, k, v, do, causal, 1.0 / math.sqrt(32))
    for i, name in enumerate(["out", "dq", "dk", "dv"]):
        assert_close(name, ours[i], ref[i], torch.float32)


def test_tma_only_where_the_strides_allow(monkeypatch):
    monkeypatch.setattr(fa, "tma", "on")
    x = torch.randn(2, 2, 40, 32, device=DEVICE)
    assert fa._use_tma(x, x)
    assert not fa._use_tma(x, torch.randn(2, 2, 40, 1, device=DEVICE).expand(2, 2, 40, 32))  # last dim stride 0
    assert not fa._use_tma(x, torch.randn(2, 2, 40, 33, device=DEVICE)[..., :32])  # 132-byte rows
    monkeypatch.setattr(fa, "tma", "off")
    assert not fa._use_tma(x, x)
    if not ON_GPU:  # "auto" leaves the interpreter on pointers
        monkeypatch.setattr(fa, "tma", "auto")
        assert not fa._use_tma(x, x)
