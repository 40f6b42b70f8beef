"""The rollout engine's decode-step attention as one Triton kernel (decode_step.attend_one says when it runs).

Imported only on a GPU: triton is a GPU extra. One program per (row, kv head): its query groups against the keys
that row may see, read once, with the softmax kept online (running maximum and sum) and the learned sink added as
one more logit at the end. Only the keys in range are read: up to the row's position, and for a sliding layer
only its window, where the plain path reads the whole cache buffer and masks it.
"""

import triton
import triton.language as tl


@triton.jit
def decode_attention_kernel(q_ptr, k_ptr, v_ptr, sinks_ptr, pos_ptr, out_ptr, scaling, length, window,
                            KV: tl.constexpr, GROUPS: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr,
                            BLOCK_N: tl.constexpr):
    """out[b] = softmax([q k^T * scaling, sink]) v over the keys in [start, pos] of program b = row * KV + kv head.

    q, out: [rows * KV, GROUPS, D]; k, v: the caches [rows, KV, length, D]; sinks: [rows * KV, GROUPS]; pos: [rows]
    (the position just written); window: a sliding layer's window (the cache length for a full one). The scores are
    rounded to bf16 after the product and after the scaling, as transformers' eager attention rounds them; the
    softmax runs in fp32, the unnormalised probabilities enter the weighted sum as bf16 (fp32 sums), normalised once
    at the end (the plain path rounds the normalised probabilities to bf16 instead)."""
    program = tl.program_id(0)
    row = program // KV
    pos = tl.load(pos_ptr + row).to(tl.int32)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    g_ok = g < GROUPS
    q_rows = (program.to(tl.int64) * GROUPS + g[:, None]) * D + d[None, :]
    q = tl.load(q_ptr + q_rows, mask=g_ok[:, None], other=0.0)
    end = pos + 1
    start = tl.maximum(end - window, 0)
    cache = program.to(tl.int64) * length * D
    running_max = tl.full([BLOCK_G], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    for n0 in range((start // BLOCK_N) * BLOCK_N, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = (n >= start) & (n < end)
        k = tl.load(k_ptr + cache + n[:, None] * D + d[None, :], mask=n_ok[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k)).to(tl.bfloat16).to(tl.float32) * scaling
        scores = tl.where(n_ok[None, :], scores.to(tl.bfloat16).to(tl.float32), float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        probs = tl.exp(scores - new_max[:, None])
        shrink = tl.exp(running_max - new_max)
        running_sum = running_sum * shrink + tl.sum(probs, 1)
        v = tl.load(v_ptr + cache + n[:, None] * D + d[None, :], mask=n_ok[:, None], other=0.0)
        acc = acc * shrink[:, None] + tl.dot(probs.to(v.dtype), v)
        running_max = new_max
    sink = tl.load(sinks_ptr + program.to(tl.int64) * GROUPS + g, mask=g_ok, other=0.0).to(tl.float32)
    final_max = tl.maximum(running_max, sink)
    shrink = tl.exp(running_max - final_max)
    total = running_sum * shrink + tl.exp(sink - final_max)
    out = acc * (shrink / total)[:, None]
    tl.store(out_ptr + q_rows, out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None])
