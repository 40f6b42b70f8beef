"""The decode step's last expert step as one Triton kernel: every expert's output weighted by each token's routing
weight and summed (mxfp4_experts.combine_experts says when it runs).

Imported only on a GPU: triton is a GPU extra. One program per (token, block of hidden columns) walks the experts
and reads only the rows of those the token was routed to (4 of 32 in gpt-oss), each along its columns. Compiled
from plain torch, the same sum was a reduction over the experts' dimension, whose values lie a whole [tokens,
hidden] matrix apart, and it read every expert's row: ~8 us a layer on an H200.
"""

import triton
import triton.language as tl


@triton.jit
def combine_experts_kernel(out_ptr, routing_ptr, result_ptr, tokens, hidden, EXPERTS: tl.constexpr,
                           BLOCK: tl.constexpr):
    """result[t] = sum over experts e of out[e, t] * routing[t, e], for out [EXPERTS, tokens, hidden] and routing
    [tokens, EXPERTS] in the same dtype: each product rounded to that dtype, as an eager multiply rounds it, summed
    in fp32 in the experts' order, rounded once. A zero routing weight (an expert outside the token's top k) adds
    nothing and its row is not read."""
    token = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < hidden
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for e in range(EXPERTS):
        weight = tl.load(routing_ptr + token * EXPERTS + e)
        if weight != 0:
            row = tl.load(out_ptr + (e * tokens + token).to(tl.int64) * hidden + cols, mask=ok, other=0.0)
            total += (row * weight).to(routing_ptr.dtype.element_ty).to(tl.float32)
    tl.store(result_ptr + token.to(tl.int64) * hidden + cols, total.to(result_ptr.dtype.element_ty), mask=ok)
