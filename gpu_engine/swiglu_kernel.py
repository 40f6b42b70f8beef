"""The experts' SwiGLU for many rows as two Triton kernels, forward and backward, and its autograd function.

Imported only on a GPU: triton is a GPU extra. mxfp4_experts.swiglu in eager torch is eight kernels over the
[rows, intermediate] activations (the interleaved halves, two clamps, the scaled gate, its sigmoid, two products,
the +1) and autograd keeps five of their results for the backward, ~0.7 GB a layer at a W micro-batch. Here the
forward reads gate_up once and writes the activation, rounding each step to the activations' dtype as those eager
ops round it (the same values, but where triton's sigmoid and torch's differ in the last float32 bit across a
rounding boundary); the backward keeps only gate_up and computes the gradient in float32 from it, rounded once.
mxfp4_experts.grouped_forward takes it where GROUPED_MATMUL is 'fused'.
"""

import torch
import triton
import triton.language as tl

from gpu_engine.mxfp4_kernels import rounded_swiglu

BLOCK = 1024  # activations a program computes


@triton.jit
def gate_and_up(gate_up_ptr, i, ok):
    """The gate and up values of activations i (gate_up's columns alternate gate, up), as float32."""
    pair = tl.load(gate_up_ptr + (2 * i)[:, None] + tl.arange(0, 2)[None, :], mask=ok[:, None], other=0.0)
    return tl.split(pair.to(tl.float32))


@triton.jit
def swiglu_forward_kernel(gate_up_ptr, out_ptr, n, limit, alpha, BLOCK: tl.constexpr):
    """out = (clamp(up) + 1) * clamp(gate) * sigmoid(alpha * clamp(gate)), each step rounded to out's dtype."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    gate, up = gate_and_up(gate_up_ptr, i, ok)
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    tl.store(out_ptr + i, rounded_swiglu(gate, up, limit, alpha, dtype).to(dtype), mask=ok)


@triton.jit
def swiglu_backward_kernel(gate_up_ptr, grad_ptr, grad_in_ptr, n, limit, alpha, BLOCK: tl.constexpr):
    """The gradient of swiglu_forward_kernel's function (clamps pass it inside their bounds, as torch's clamp
    does), in float32, written interleaved as gate_up."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    gate, up = gate_and_up(gate_up_ptr, i, ok)
    grad = tl.load(grad_ptr + i, mask=ok, other=0.0).to(tl.float32)
    gate_c = tl.minimum(gate, limit)
    up_c = tl.minimum(tl.maximum(up, -limit), limit)
    s = tl.sigmoid(alpha * gate_c)
    d_up = tl.where((up >= -limit) & (up <= limit), grad * gate_c * s, 0.0)
    d_gate = tl.where(gate <= limit, grad * (up_c + 1.0) * (s + alpha * gate_c * s * (1.0 - s)), 0.0)
    pair = tl.join(d_gate, d_up).to(grad_in_ptr.dtype.element_ty)  # [BLOCK, 2]: gate first
    tl.store(grad_in_ptr + (2 * i)[:, None] + tl.arange(0, 2)[None, :], pair, mask=ok[:, None])


class FusedSwiglu(torch.autograd.Function):
    """mxfp4_experts.swiglu(gate_up, limit, alpha) for gate_up [..., 2 x intermediate] on a GPU; saves gate_up alone."""

    @staticmethod
    def forward(ctx, gate_up, limit, alpha):
        gate_up = gate_up.contiguous()
        ctx.save_for_backward(gate_up)
        ctx.limit, ctx.alpha = limit, alpha
        out = gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)
        n = out.numel()
        swiglu_forward_kernel[(triton.cdiv(n, BLOCK),)](gate_up, out, n, limit, alpha, BLOCK=BLOCK)
        return out

    @staticmethod
    def backward(ctx, grad):
        (gate_up,) = ctx.saved_tensors
        grad_in = torch.empty_like(gate_up)
        n = grad.numel()
        swiglu_backward_kernel[(triton.cdiv(n, BLOCK),)](gate_up, grad.contiguous(), grad_in, n, ctx.limit, ctx.alpha,
                                                         BLOCK=BLOCK)
        return grad_in, None, None
