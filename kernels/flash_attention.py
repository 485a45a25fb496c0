"""Fused scaled-dot-product attention (FlashAttention-2 style) in Triton, forward and backward.

    out = softmax(q @ k^T * softmax_scale [+ causal mask]) @ v

The T x T score matrix never reaches memory: the forward streams key/value blocks past a block of
queries with an online softmax and saves one log-sum-exp per query row (fp32); the backward recomputes
the probabilities block by block from it. Backward = three launches:
  1. preprocess: delta = rowsum(dO * O)
  2. dK, dV: one program per key block, keeping k, v, dk, dv in registers, looping over query blocks
  3. dQ:     one program per query block, looping over key blocks
Causal attention skips the blocks above the diagonal and applies the mask only to the blocks that
straddle it (a separate, masked loop stage), which is most of its speed.

Softmax uses exp2 with log2(e) folded into the scale. Dots take fp16/bf16 operands with fp32
accumulation; fp32 inputs use full-precision (not tf32) dots. Under the Triton interpreter bf16 is
not supported, so there every tile is upcast to fp32 after its load (a no-op on the GPU path).
"""
import contextlib
import inspect
import math
import os

import torch
import triton
import triton.language as tl

# Kernels are interpreted (on CPU tensors) exactly when Triton was in interpreter mode as they were defined.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------
@triton.jit
def _load_block(ptrs, desc, row, rows_valid, MASKED: tl.constexpr, USE_TMA: tl.constexpr):
    """A (rows, HEAD_DIM) block starting at `row`: through the TMA descriptor (rows past the end read as
    zeros), or through pointers, masked to rows_valid when MASKED."""
    if USE_TMA:
        return desc.load([row, 0])
    elif MASKED:
        return tl.load(ptrs, mask=rows_valid[:, None], other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _descriptor(base, seq_len, stride_t, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr):
    """A TMA descriptor over one (seq_len, HEAD_DIM) head of a tensor (last dim contiguous); without TMA,
    the base pointer itself (a placeholder that _load_block never reads)."""
    if USE_TMA:
        return tl.make_tensor_descriptor(base, shape=[seq_len, HEAD_DIM], strides=[stride_t, 1],
                                         block_shape=[BLOCK, HEAD_DIM])
    else:
        return base


@triton.jit
def _attn_fwd_inner(acc, m_i, l_i, q, K, V, k_desc, v_desc, stride_kt, stride_kd, stride_vt, stride_vd,
                    offs_m, offs_d, lo, hi, seq_len, qk_scale,
                    CAUSAL: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr):
    """Online softmax over key blocks [lo, hi). MASKED blocks get the causal and sequence-end masks."""
    offs_n = lo + tl.arange(0, BLOCK_N)
    k_ptrs = K + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd
    v_ptrs = V + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd
    for start_n in range(lo, hi, BLOCK_N):
        key_valid = offs_n < seq_len
        k = _load_block(k_ptrs, k_desc, start_n, key_valid, MASKED, USE_TMA)
        if UPCAST:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if MASKED:
            keep = key_valid[None, :]
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            qk = tl.where(keep, qk, float("-inf"))
        # Every row sees at least one unmasked key in its first block, so m_ij is always finite.
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_block(v_ptrs, v_desc, start_n, key_valid, MASKED, USE_TMA)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_ij
        offs_n += BLOCK_N
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE,
                     stride_qb, stride_qh, stride_qt, stride_qd,
                     stride_kb, stride_kh, stride_kt, stride_kd,
                     stride_vb, stride_vh, stride_vt, stride_vd,
                     stride_ob, stride_oh, stride_ot, stride_od,
                     num_heads, seq_len, qk_scale, SEQ_BUCKET,
                     HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    # Heaviest (last, for causal) query blocks first: fewer idle SMs at the end of the launch.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    head = tl.program_id(1)
    batch = tl.program_id(2)
    Q += batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    K += batch.to(tl.int64) * stride_kb + head.to(tl.int64) * stride_kh
    V += batch.to(tl.int64) * stride_vb + head.to(tl.int64) * stride_vh
    O += batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
    LSE += (batch * num_heads + head).to(tl.int64) * seq_len

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_valid = offs_m < seq_len
    q_desc = _descriptor(Q, seq_len, stride_qt, BLOCK_M, HEAD_DIM, USE_TMA)
    k_desc = _descriptor(K, seq_len, stride_kt, BLOCK_N, HEAD_DIM, USE_TMA)
    v_desc = _descriptor(V, seq_len, stride_vt, BLOCK_N, HEAD_DIM, USE_TMA)
    q = _load_block(Q + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, q_desc, start_m, row_valid,
                    True, USE_TMA)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    if CAUSAL:
        # Keys left of this query block: no mask. Keys on the diagonal: masked.
        unmasked_end = start_m
        masked_end = tl.minimum(start_m + BLOCK_M, seq_len)
    else:
        # All full key blocks: no mask. The last partial block: masked.
        unmasked_end = (seq_len // BLOCK_N) * BLOCK_N
        masked_end = seq_len
    acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, K, V, k_desc, v_desc, stride_kt, stride_kd, stride_vt,
                                    stride_vd, offs_m, offs_d, 0, unmasked_end, seq_len, qk_scale,
                                    CAUSAL, False, UPCAST, DOT_PRECISION, BLOCK_N, USE_TMA)
    acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, K, V, k_desc, v_desc, stride_kt, stride_kd, stride_vt,
                                    stride_vd, offs_m, offs_d, unmasked_end, masked_end, seq_len, qk_scale,
                                    CAUSAL, True, UPCAST, DOT_PRECISION, BLOCK_N, USE_TMA)

    acc = acc / l_i[:, None]
    tl.store(LSE + offs_m, (m_i + tl.math.log2(l_i)) * _LN2, mask=row_valid)
    o_ptrs = O + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_valid[:, None])


# --------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_preprocess_kernel(O, DO, DELTA, DQ_ACC,
                                stride_ob, stride_oh, stride_ot, stride_od,
                                stride_dob, stride_doh, stride_dot, stride_dod,
                                num_heads, seq_len,
                                HEAD_DIM: tl.constexpr, ZERO_DQ: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[row] = sum_d dO[row, d] * O[row, d], in fp32; with ZERO_DQ also zeros in the (contiguous, fp32)
    dQ accumulator's rows, which the dK/dV/dQ pass then adds into."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    head = tl.program_id(1)
    batch = tl.program_id(2)
    O += batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
    DO += batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
    DELTA += (batch * num_heads + head).to(tl.int64) * seq_len
    offs_d = tl.arange(0, HEAD_DIM)
    row_valid = offs_m < seq_len
    o = tl.load(O + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od, mask=row_valid[:, None], other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod, mask=row_valid[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + offs_m, delta, mask=row_valid)
    if ZERO_DQ:
        DQ_ACC += (batch * num_heads + head).to(tl.int64) * seq_len * HEAD_DIM
        tl.store(DQ_ACC + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
                 tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32), mask=row_valid[:, None])


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, DQ_ACC, q_desc, do_desc,
                         stride_qt, stride_qd, stride_dot, stride_dod,
                         offs_n, offs_d, lo, hi, seq_len, qk_scale,
                         CAUSAL: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr, USE_TMA: tl.constexpr,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """Accumulate dK, dV of one key block over query blocks [lo, hi), working on transposed scores; with
    ATOMIC_DQ also add the block's share of dQ (unscaled) into the fp32 accumulator."""
    offs_m = lo + tl.arange(0, BLOCK_M)
    q_ptrs = Q + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
    do_ptrs = DO + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod
    for start_m in range(lo, hi, BLOCK_M):
        row_valid = offs_m < seq_len
        q = _load_block(q_ptrs, q_desc, start_m, row_valid, MASKED, USE_TMA)
        if MASKED:
            lse = tl.load(LSE + offs_m, mask=row_valid, other=0.0)
        else:
            lse = tl.load(LSE + offs_m)
        if UPCAST:
            q = q.to(tl.float32)
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        p_t = tl.math.exp2(qk_t * qk_scale - (lse * _LOG2E)[None, :])
        if MASKED:
            keep = row_valid[None, :]
            if CAUSAL:
                keep = keep & (offs_m[None, :] >= offs_n[:, None])
            p_t = tl.where(keep, p_t, 0.0)
        do = _load_block(do_ptrs, do_desc, start_m, row_valid, MASKED, USE_TMA)
        if MASKED:
            delta = tl.load(DELTA + offs_m, mask=row_valid, other=0.0)
        else:
            delta = tl.load(DELTA + offs_m)
        if UPCAST:
            do = do.to(tl.float32)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk = tl.dot(ds_t, q, dk, input_precision=DOT_PRECISION)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(ds_t), k, input_precision=DOT_PRECISION)
            dq_ptrs = DQ_ACC + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
            if MASKED:
                tl.atomic_add(dq_ptrs, dq, mask=row_valid[:, None], sem="relaxed")
            else:
                tl.atomic_add(dq_ptrs, dq, sem="relaxed")
        offs_m += BLOCK_M
        q_ptrs += BLOCK_M * stride_qt
        do_ptrs += BLOCK_M * stride_dot
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC,
                          stride_qb, stride_qh, stride_qt, stride_qd,
                          stride_kb, stride_kh, stride_kt, stride_kd,
                          stride_vb, stride_vh, stride_vt, stride_vd,
                          stride_dob, stride_doh, stride_dot, stride_dod,
                          stride_dkb, stride_dkh, stride_dkt, stride_dkd,
                          stride_dvb, stride_dvh, stride_dvt, stride_dvd,
                          num_heads, seq_len, qk_scale, softmax_scale, SEQ_BUCKET,
                          HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr, USE_TMA: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tl.static_assert(BLOCK_N % BLOCK_M == 0)
    start_n = tl.program_id(0) * BLOCK_N  # first key blocks see the most queries under causal: run first
    head = tl.program_id(1)
    batch = tl.program_id(2)
    Q += batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    K += batch.to(tl.int64) * stride_kb + head.to(tl.int64) * stride_kh
    V += batch.to(tl.int64) * stride_vb + head.to(tl.int64) * stride_vh
    DO += batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
    DK += batch.to(tl.int64) * stride_dkb + head.to(tl.int64) * stride_dkh
    DV += batch.to(tl.int64) * stride_dvb + head.to(tl.int64) * stride_dvh
    LSE += (batch * num_heads + head).to(tl.int64) * seq_len
    DELTA += (batch * num_heads + head).to(tl.int64) * seq_len
    DQ_ACC += (batch * num_heads + head).to(tl.int64) * seq_len * HEAD_DIM  # contiguous (B, H, T, D) fp32

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_valid = offs_n < seq_len
    q_desc = _descriptor(Q, seq_len, stride_qt, BLOCK_M, HEAD_DIM, USE_TMA)
    do_desc = _descriptor(DO, seq_len, stride_dot, BLOCK_M, HEAD_DIM, USE_TMA)
    k = _load_block(K + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                    _descriptor(K, seq_len, stride_kt, BLOCK_N, HEAD_DIM, USE_TMA), start_n, key_valid, True, USE_TMA)
    v = _load_block(V + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                    _descriptor(V, seq_len, stride_vt, BLOCK_N, HEAD_DIM, USE_TMA), start_n, key_valid, True, USE_TMA)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    full_rows_end = (seq_len // BLOCK_M) * BLOCK_M
    if CAUSAL:
        # Query blocks on the diagonal (masked), then those below it (no mask).
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, DQ_ACC, q_desc, do_desc,
                                      stride_qt, stride_qd, stride_dot, stride_dod,
                                      offs_n, offs_d, start_n, tl.minimum(start_n + BLOCK_N, seq_len), seq_len,
                                      qk_scale, CAUSAL, True, UPCAST, DOT_PRECISION, ATOMIC_DQ, USE_TMA,
                                      HEAD_DIM, BLOCK_M)
        unmasked_start = start_n + BLOCK_N
        tail_start = tl.maximum(unmasked_start, full_rows_end)
    else:
        unmasked_start = 0
        tail_start = full_rows_end
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, DQ_ACC, q_desc, do_desc,
                                  stride_qt, stride_qd, stride_dot, stride_dod,
                                  offs_n, offs_d, unmasked_start, full_rows_end, seq_len,
                                  qk_scale, CAUSAL, False, UPCAST, DOT_PRECISION, ATOMIC_DQ, USE_TMA, HEAD_DIM, BLOCK_M)
    # The last, partial query block (rows past the sequence end are masked out).
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, DQ_ACC, q_desc, do_desc,
                                  stride_qt, stride_qd, stride_dot, stride_dod,
                                  offs_n, offs_d, tail_start, seq_len, seq_len,
                                  qk_scale, CAUSAL, True, UPCAST, DOT_PRECISION, ATOMIC_DQ, USE_TMA, HEAD_DIM, BLOCK_M)

    dk *= softmax_scale
    tl.store(DK + offs_n[:, None] * stride_dkt + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=key_valid[:, None])
    tl.store(DV + offs_n[:, None] * stride_dvt + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=key_valid[:, None])


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse2, delta, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
                       offs_m, offs_d, lo, hi, seq_len, qk_scale,
                       CAUSAL: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """Accumulate dQ of one query block over key blocks [lo, hi)."""
    offs_n = lo + tl.arange(0, BLOCK_N)
    k_ptrs = K + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd
    v_ptrs = V + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd
    for _ in range(lo, hi, BLOCK_N):
        if MASKED:
            key_valid = offs_n < seq_len
            k = tl.load(k_ptrs, mask=key_valid[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=key_valid[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if MASKED:
            keep = key_valid[None, :]
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
        offs_n += BLOCK_N
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                        stride_qb, stride_qh, stride_qt, stride_qd,
                        stride_kb, stride_kh, stride_kt, stride_kd,
                        stride_vb, stride_vh, stride_vt, stride_vd,
                        stride_dob, stride_doh, stride_dot, stride_dod,
                        stride_dqb, stride_dqh, stride_dqt, stride_dqd,
                        num_heads, seq_len, qk_scale, softmax_scale, SEQ_BUCKET,
                        HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # heaviest first, as in the forward
    head = tl.program_id(1)
    batch = tl.program_id(2)
    Q += batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    K += batch.to(tl.int64) * stride_kb + head.to(tl.int64) * stride_kh
    V += batch.to(tl.int64) * stride_vb + head.to(tl.int64) * stride_vh
    DO += batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
    DQ += batch.to(tl.int64) * stride_dqb + head.to(tl.int64) * stride_dqh
    LSE += (batch * num_heads + head).to(tl.int64) * seq_len
    DELTA += (batch * num_heads + head).to(tl.int64) * seq_len

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_valid = offs_m < seq_len
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=row_valid[:, None], other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod, mask=row_valid[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.load(LSE + offs_m, mask=row_valid, other=0.0) * _LOG2E
    delta = tl.load(DELTA + offs_m, mask=row_valid, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    if CAUSAL:
        unmasked_end = start_m
        masked_end = tl.minimum(start_m + BLOCK_M, seq_len)
    else:
        unmasked_end = (seq_len // BLOCK_N) * BLOCK_N
        masked_end = seq_len
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
                            offs_m, offs_d, 0, unmasked_end, seq_len, qk_scale,
                            CAUSAL, False, UPCAST, DOT_PRECISION, BLOCK_N)
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
                            offs_m, offs_d, unmasked_end, masked_end, seq_len, qk_scale,
                            CAUSAL, True, UPCAST, DOT_PRECISION, BLOCK_N)

    dq *= softmax_scale
    tl.store(DQ + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=row_valid[:, None])


# --------------------------------------------------------------------------------------------------
# Block configurations
# --------------------------------------------------------------------------------------------------
# BLOCK_M counts query rows, BLOCK_N key rows. Forward and dQ loop over key blocks (BLOCK_M % BLOCK_N == 0);
# dK/dV loops over query blocks (BLOCK_N % BLOCK_M == 0).
def _config(block_m, block_n, num_warps, num_stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


# Under the interpreter: big enough to be quick, small enough that test shapes span several blocks,
# a diagonal that straddles two inner blocks, and a partial last block.
_INTERPRETER_CONFIGS = {"fwd": _config(32, 16, 4, 1), "dkdv": _config(16, 32, 4, 1), "dq": _config(32, 16, 4, 1)}
# fp32 (full-precision dots, twice the bytes per tile): one modest config. Key: head_dim <= 64.
_FP32_CONFIGS = {
    "fwd": {True: _config(64, 32, 4, 2), False: _config(64, 32, 4, 2)},
    "dkdv": {True: _config(32, 64, 4, 2), False: _config(32, 32, 4, 2)},
    "dq": {True: _config(64, 32, 4, 2), False: _config(32, 32, 4, 2)},
}
# fp16/bf16, short sequences (launch-bound, up to a few blocks per head): one config, no tuning run.
_SHORT_SEQ = 256
_SHORT_CONFIGS = {"fwd": _config(64, 64, 4, 3), "dkdv": _config(32, 64, 4, 3), "dq": _config(64, 64, 4, 3)}
# fp16/bf16, longer sequences: autotuned, keyed on (head_dim, seq bucket, causal, TMA, dQ mode). Key: head_dim
# <= 64. The first candidates of each list are the winners of a sweep on an H100 (bf16, causal and full, seq
# 2k-8k, before TMA loads and the atomic dQ); the rest widen the search over BLOCK_N and pipeline stages.
# At head_dim 128 the 4-warp variants of 128-row tiles spill registers and run 2-3x slower: left out.
_TUNED_CONFIGS = {
    "fwd": {
        True: [_config(128, 64, 8, 3), _config(64, 64, 4, 3), _config(128, 64, 4, 3), _config(128, 128, 4, 3),
               _config(128, 32, 4, 3), _config(128, 64, 4, 4), _config(128, 128, 8, 3), _config(64, 32, 4, 4)],
        False: [_config(128, 64, 8, 3), _config(64, 64, 4, 3), _config(128, 128, 8, 3),
                _config(128, 32, 8, 3), _config(128, 64, 8, 4), _config(128, 128, 8, 2), _config(64, 32, 4, 3)],
    },
    "dkdv": {
        True: [_config(32, 64, 4, 3), _config(64, 64, 4, 3), _config(32, 128, 4, 3), _config(64, 128, 8, 3),
               _config(16, 64, 4, 3), _config(32, 128, 8, 3), _config(32, 64, 4, 5), _config(64, 128, 8, 2)],
        False: [_config(32, 64, 4, 3), _config(64, 128, 8, 3), _config(64, 64, 4, 3),
                _config(32, 128, 8, 3), _config(16, 64, 4, 3), _config(32, 64, 4, 4), _config(64, 64, 8, 3)],
    },
    "dq": {
        True: [_config(64, 64, 4, 3), _config(128, 64, 4, 3), _config(128, 32, 4, 3), _config(128, 64, 8, 3)],
        False: [_config(128, 64, 8, 3), _config(128, 128, 8, 2), _config(64, 32, 4, 3)],
    },
}


def _configs(kind, head_dim, dtype, seq_len):
    if _INTERPRET:
        return [_INTERPRETER_CONFIGS[kind]]
    if dtype == torch.float32:
        return [_FP32_CONFIGS[kind][head_dim <= 64]]
    if seq_len <= _SHORT_SEQ:
        return [_SHORT_CONFIGS[kind]]
    return _TUNED_CONFIGS[kind][head_dim <= 64]


_TUNERS = {}
_BEST_CONFIGS = {}
# The winners are kept in Triton's on-disk cache where this Triton can (3.2+): every process of a sweep
# (a training pack, an evaluation) would otherwise time the same configs again.
_AUTOTUNE_CACHE = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


def _launch(kernel, configs, tune_key, grid, *args, reset_to_zero=None, **constexprs):
    """Launch with the single config given, or the fastest of several. The autotuner times them on the
    first call per tune_key; later calls launch the winner directly, skipping its per-call bookkeeping
    (which costs tens of microseconds, a lot next to a short sequence's kernel). reset_to_zero: arguments
    the kernel adds into, zeroed before each timed run and again before the real one."""
    if len(configs) == 1:
        cfg = configs[0]
    else:
        # the config tables are module constants; a tuner that zeros an accumulator is another tuner
        configs_id = (kernel, tuple(id(c) for c in configs), tuple(reset_to_zero or ()))
        cfg = _BEST_CONFIGS.get((configs_id, tune_key))
        if cfg is None:
            if configs_id not in _TUNERS:
                key = [name for name in ("HEAD_DIM", "SEQ_BUCKET", "CAUSAL", "USE_TMA", "ATOMIC_DQ")
                       if name in kernel.arg_names]
                _TUNERS[configs_id] = triton.autotune(configs=list(configs), key=key, reset_to_zero=reset_to_zero,
                                                      **_AUTOTUNE_CACHE)(kernel)
            tuner = _TUNERS[configs_id]
            tuner[grid](*args, **constexprs)
            _BEST_CONFIGS[(configs_id, tune_key)] = tuner.best_config
            return
    kernel[grid](*args, **constexprs, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _seq_bucket(seq_len):
    return min(max(triton.next_power_of_2(seq_len), 64), 16384)


def _kernel_flags(dtype):
    upcast = _INTERPRET and dtype == torch.bfloat16
    precision = "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for fp16/bf16 operands
    return dict(UPCAST=upcast, DOT_PRECISION=precision)


def _device_context(t):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# How the backward gets dQ (see the module docstring): "atomic" (five matmuls, fp32 atomics) or "separate".
DQ_MODES = ("atomic", "separate")
dq_mode = "atomic"
# TMA descriptor loads: "auto" (on Hopper and newer GPUs, where the strides allow), "off", or "on" (wherever
# the strides allow, e.g. under the interpreter, which emulates descriptors).
tma = "auto"
_ALLOCATOR_SET = []


def _use_tma(*tensors):
    """Whether this launch loads through TMA descriptors: every tensor's rows 16-byte aligned, last dim dense."""
    if tma == "off" or not hasattr(tl, "make_tensor_descriptor"):
        return False
    if tma == "auto" and (_INTERPRET or not tensors[0].is_cuda or torch.cuda.get_device_capability(tensors[0].device)[0] < 9):
        return False
    for t in tensors:
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(st * size % 16 for st in t.stride()[:-1]):
            return False
    if tensors[0].is_cuda and not _ALLOCATOR_SET:  # descriptors made on the device need scratch memory
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _ALLOCATOR_SET.append(True)
    return True


def _strides(t):
    return tuple(t.stride())


# Output buffers come from here (tests swap it for a NaN-filled allocator to catch unwritten elements).
_empty = torch.empty


def _attention_forward(q, k, v, causal, softmax_scale, configs=None):
    """Returns (out, lse): out like q (contiguous), lse (batch, heads, seq) fp32 natural-log log-sum-exp."""
    batch, heads, seq_len, head_dim = q.shape
    out = _empty(q.shape, dtype=q.dtype, device=q.device)
    lse = _empty((batch, heads, seq_len), dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return out, lse
    configs = configs or _configs("fwd", head_dim, q.dtype, seq_len)
    bucket = _seq_bucket(seq_len)
    use_tma = _use_tma(q, k, v)

    def grid(meta):
        return (triton.cdiv(seq_len, meta["BLOCK_M"]), heads, batch)

    with _device_context(q):
        _launch(_attn_fwd_kernel, configs, (head_dim, bucket, causal, q.dtype, q.device, use_tma), grid,
                q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
                heads, seq_len, softmax_scale * 1.4426950408889634, bucket,
                HEAD_DIM=head_dim, CAUSAL=causal, USE_TMA=use_tma, **_kernel_flags(q.dtype))
    return out, lse


def _attention_backward(do, q, k, v, out, lse, causal, softmax_scale, dkdv_configs=None, dq_configs=None,
                        mode=None):
    """Returns (dq, dk, dv) for the upstream gradient do (any strides, e.g. expanded). mode: a DQ_MODES
    entry, default the module's dq_mode."""
    mode = mode or dq_mode
    if mode not in DQ_MODES:
        raise ValueError(f"flash_attention: dq mode must be one of {DQ_MODES}, got {mode!r}")
    atomic = mode == "atomic"
    batch, heads, seq_len, head_dim = q.shape
    dk = _empty(k.shape, dtype=k.dtype, device=k.device)
    dv = _empty(v.shape, dtype=v.dtype, device=v.device)
    if q.numel() == 0:
        return _empty(q.shape, dtype=q.dtype, device=q.device), dk, dv
    delta = _empty((batch, heads, seq_len), dtype=torch.float32, device=q.device)
    # atomic: dQ accumulates in fp32 (contiguous), zeroed by the preprocess kernel; separate: written once.
    dq_acc = _empty(q.shape if atomic else (1,), dtype=torch.float32, device=q.device)
    flags = _kernel_flags(q.dtype)
    qk_scale = softmax_scale * 1.4426950408889634
    bucket = _seq_bucket(seq_len)
    use_tma = _use_tma(q, k, v, do)
    dkdv_configs = dkdv_configs or _configs("dkdv", head_dim, q.dtype, seq_len)

    def query_grid(meta):
        return (triton.cdiv(seq_len, meta["BLOCK_M"]), heads, batch)

    def key_grid(meta):
        return (triton.cdiv(seq_len, meta["BLOCK_N"]), heads, batch)

    with _device_context(q):
        preprocess_block = 32 if _INTERPRET else 64
        _attn_bwd_preprocess_kernel[(triton.cdiv(seq_len, preprocess_block), heads, batch)](
            out, do, delta, dq_acc, *_strides(out), *_strides(do), heads, seq_len,
            HEAD_DIM=head_dim, ZERO_DQ=atomic, BLOCK_M=preprocess_block)
        tune_key = (head_dim, bucket, causal, q.dtype, q.device, use_tma, atomic)
        _launch(_attn_bwd_dkdv_kernel, dkdv_configs, tune_key, key_grid, q, k, v, do, lse, delta, dk, dv, dq_acc,
                *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
                heads, seq_len, qk_scale, softmax_scale, bucket, reset_to_zero=["DQ_ACC"] if atomic else None,
                HEAD_DIM=head_dim, CAUSAL=causal, ATOMIC_DQ=atomic, USE_TMA=use_tma, **flags)
        if atomic:
            dq = dq_acc.mul_(softmax_scale)
            return (dq if q.dtype == torch.float32 else dq.to(q.dtype)), dk, dv
        dq = _empty(q.shape, dtype=q.dtype, device=q.device)
        _launch(_attn_bwd_dq_kernel, dq_configs or _configs("dq", head_dim, q.dtype, seq_len),
                (head_dim, bucket, causal, q.dtype, q.device), query_grid, q, k, v, do, lse, delta, dq,
                *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
                heads, seq_len, qk_scale, softmax_scale, bucket,
                HEAD_DIM=head_dim, CAUSAL=causal, **flags)
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale):
        out, lse = _attention_forward(q, k, v, causal, softmax_scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal = causal
        ctx.softmax_scale = softmax_scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _attention_backward(do, q, k, v, out, lse, ctx.causal, ctx.softmax_scale)
        return dq, dk, dv, None, None


def _check_inputs(q, k, v, causal, softmax_scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"flash_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"flash_attention: {name} must have shape (batch, heads, seq, head_dim), "
                             f"got {tuple(t.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"flash_attention: q, k, v must have the same shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"flash_attention: q, k, v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"flash_attention: dtype {q.dtype} is not supported; use float16, bfloat16 or float32")
    if not (q.device == k.device == v.device):
        raise ValueError(f"flash_attention: q, k, v must be on the same device, got {q.device}, {k.device}, {v.device}")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"flash_attention: head_dim {q.shape[-1]} is not supported; use one of {SUPPORTED_HEAD_DIMS}")
    if not q.is_cuda and not _INTERPRET:
        raise ValueError(f"flash_attention: tensors are on {q.device}; move them to a CUDA GPU "
                         f"(or set TRITON_INTERPRET=1 before importing to run the kernels on the CPU, slowly)")
    if q.shape[0] > 65535 or q.shape[1] > 65535:
        raise ValueError(f"flash_attention: batch and heads must each be at most 65535, got {tuple(q.shape[:2])}")
    if not isinstance(causal, bool):
        raise ValueError(f"flash_attention: causal must be True or False, got {causal!r}")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and
                                          math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"flash_attention: softmax_scale must be a positive finite number or None, "
                         f"got {softmax_scale!r}")


def flash_attention(q, k, v, causal=True, softmax_scale=None):
    """Attention over (batch, heads, seq, head_dim) tensors, like F.scaled_dot_product_attention.

    causal: mask keys after each query (is_causal=True in SDPA). softmax_scale: defaults to 1/sqrt(head_dim).
    Supports float16/bfloat16/float32, head_dim 16/32/64/128, any sequence length and any strides
    (e.g. q, k, v split from a packed qkv tensor). Returns a tensor of q's shape and dtype.
    """
    _check_inputs(q, k, v, causal, softmax_scale)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return FlashAttentionFunction.apply(q, k, v, causal, scale)
