"""The decode step's last expert step as one Triton kernel: every expert's output weighted by each token's routing
weight and summed (mxfp4_experts.combine_experts says when it runs).

Imported only on a GPU: triton is a GPU extra. One program per (token, block of hidden columns) loads the token's
routing weights for all experts at once and reads only the rows of those the token was routed to (4 of 32 in
gpt-oss; the other rows' loads are masked off), each along its columns. Compiled from plain torch, the same sum was
a reduction over the experts' dimension, whose values lie a whole [tokens, hidden] matrix apart, and it read every
expert's row.
"""

import triton
import triton.language as tl

BLOCK = 256  # hidden columns a program sums (2880 / 256 -> 12 programs a token: ~400 at a decode step of 32 rows)


@triton.jit
def combine_experts_kernel(out_ptr, routing_ptr, rows_ptr, result_ptr, tokens, hidden, EXPERTS: tl.constexpr,
                           EXPERTS_PADDED: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    """result[t] = sum over experts e of out[e, t] * routing[t, e], for out [EXPERTS, tokens, hidden] and routing
    [tokens, EXPERTS] in the same dtype, or with ROWS of out[rows[t, e]] for out [pairs, hidden] (rows: int32
    [tokens, EXPERTS], the routed layout of mxfp4_experts.routed_experts): each product rounded to that dtype, as an
    eager multiply rounds it, summed in fp32, rounded once. A zero routing weight (an expert outside the token's top
    k) adds nothing and its row is not read."""
    token = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    experts = tl.arange(0, EXPERTS_PADDED)  # tl.arange's length is a power of two
    weight = tl.load(routing_ptr + token * EXPERTS + experts, mask=experts < EXPERTS, other=0.0)
    routed = weight != 0
    if ROWS:
        row = tl.load(rows_ptr + token * EXPERTS + experts, mask=routed, other=0).to(tl.int64)
    else:
        row = (experts * tokens + token).to(tl.int64)
    values = tl.load(out_ptr + row[:, None] * hidden + cols[None, :], mask=routed[:, None] & (cols < hidden)[None, :],
                     other=0.0)
    products = (values * weight[:, None]).to(routing_ptr.dtype.element_ty).to(tl.float32)
    tl.store(result_ptr + token.to(tl.int64) * hidden + cols, tl.sum(products, axis=0).to(result_ptr.dtype.element_ty),
             mask=cols < hidden)
