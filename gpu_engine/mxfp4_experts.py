"""gpt-oss experts that stay in the checkpoint's MXFP4 bytes: the module, its matmuls, and their backward.

Why: the experts are 19.1 B of gpt-oss-20b's 20.9 B parameters: 38 GB dequantised to bf16, 10.2 GB as the
checkpoint stores them (4.25 bits a value). A LoRA leaves them frozen (an expert LoRA trains low-rank factors
beside them: expert_lora.py), so they never need to leave MXFP4, and a decode step, which reads nearly every
expert, reads a quarter of the bytes.

`Mxfp4Experts` replaces transformers' `GptOssExperts` (model_loader.load_model(..., experts_format="mxfp4")): the
same call (hidden states, router indices, routing weights), the same math (gate/up interleaved, clamped SwiGLU,
biases, routing weights applied after the down projection), with the weights held as the checkpoint's uint8
`*_blocks` [E, out, in/32, 16] / `*_scales` [E, out, in/32] (mxfp4.py's layout: each output row's inputs in blocks
of 32 values sharing a power-of-two scale, two e2m1 codes a byte, low nibble first). Three ways through it:
- few rows on a GPU (a decode step, <= DECODE_MAX_ROWS tokens, no gradient): every token through every expert, one
  Triton kernel per matrix that dequantises the weight tile in registers and multiplies it on the tensor cores
  (`dense_forward`; the rollout engine captures it in its CUDA graph: static shapes, no host sync);
- many rows (a prefill, the training forward and its recompute): the token-expert pairs sorted by expert, one
  layer's matrix dequantised into a bf16 buffer by a Triton kernel, then torch's grouped matmul; the buffer is
  freed after each matmul, so one matrix of one layer is all that is ever held in bf16 (~1 GiB at the 20b shape).
  GROUPED_MATMUL = 'fused' instead runs one Triton kernel that dequantises each weight tile in registers beside its
  rows (no bf16 matrix in memory, no host sync on the counts);
- backward: `Mxfp4GroupedMatmul` saves only references to the packed bytes, dequantises them again and multiplies
  the output gradient by the (transposed) weight: the input gradient. The experts are frozen, so no weight
  gradient exists; the routing weights' and an expert LoRA's factors' gradients come from autograd around it
  (the factors' terms are plain matmuls: `grouped_lora`).
On a CPU (the tiny stand-in, the tests) the same steps run in plain torch: `mxfp4.dequantize_mxfp4` (exact in
fp32) and one matmul per expert. That path is also the oracle the GPU kernels are tested against.

Scale byte 0 (2^-127) decodes to 0 in the dequantisation and 'interleaved' kernels; such a block's values are below
6 * 2^-127 anyway.
"""

import os
from typing import Optional

import torch

from gpu_engine import mxfp4

# -----------------------------------------------------------------------------
DECODE_MAX_ROWS = 64  # up to this many tokens every expert is read anyway: the dense kernel; above, grouped
DENSE_KERNEL = "auto"  # the decode kernel: 'auto' takes 'transposed' where it applies, else 'blocked';
                       #   'transposed' (mxfp4_kernels.transposed_matmul_kernel: the weights as the tensor cores'
                       #   operand from registers; Hopper or newer, scale bytes in TRANSPOSED_SCALE_BYTES),
                       #   'blocked' (fp16 codes by bit moves, scales on each block's sum) or 'interleaved' (bf16
                       #   weights rebuilt in registers, the first and slowest): benchmarks/RESULTS.md has the figures
KERNEL_MAX_BLOCK_M = 128  # rows a program of the dense kernel multiplies (more rows: more programs, each
                          #   dequantising its weights again)
TRANSPOSED_MAX_ROWS = 64  # the 'transposed' kernel holds all rows in one tile (more rows: 'blocked')
DECODE_ROUTED = True  # a GPU decode step of more than ROUTED_ROW_TILE tokens ('transposed' kernel, no expert LoRA)
                      #   multiplies each expert only by the rows routed to it (`routed_experts`); False: every
                      #   token through every expert
ROUTED_ROW_TILE = 16  # rows a program of a routed decode step multiplies (the tensor cores' smallest tile here)
TRANSPOSED_SCALE_BYTES = (99, 128)  # scale bytes for which 'transposed' is exact: its fp16 weights value x 2^(byte -
                                    #   119) span 0.5 x 2^-20 .. 6 x 2^9 (every one a multiple of the smallest fp16
                                    #   subnormal), its factor 2^(byte - 113) stays a normal fp16; gpt-oss' weights
                                    #   lie well inside
DEQUANT_BLOCKS = 64  # MXFP4 blocks (32 values each) dequantised per program of the dequantisation kernel
LORA_TARGETS = ("gate_up_proj", "down_proj")  # GptOssExperts' weights, the names an expert LoRA targets
GPU_CAPABILITY_VARIABLE = "GPT_OSS_GPU_CAPABILITY"  # e.g. 8.6: run a newer card's GPU code as that card's (gpu_capability)
GROUPED_MATMUL = "dequantize"  # the many-rows matmul on a GPU (a prefill, the training forward and backward):
                               #   'dequantize' (one layer's matrix into a bf16 buffer, then torch's grouped matmul)
                               #   or 'fused' (mxfp4_kernels.grouped_matmul_kernel: each weight tile dequantised in
                               #   registers, no bf16 copy of the matrix, no host sync; and the SwiGLU between the
                               #   two as swiglu_kernel.FusedSwiglu); benchmarks/RESULTS.md
GROUPED_MATMUL_VARIABLE = "GPT_OSS_GROUPED_MATMUL"  # names GROUPED_MATMUL's choice for one process (benchmark rows)
# -----------------------------------------------------------------------------


class Mxfp4Experts(torch.nn.Module):
    """transformers' GptOssExperts with its weights kept as MXFP4 blocks and scales (see the module docstring).

    Buffers and parameters carry the checkpoint's own names, so a checkpoint's tensors load into it as they are.
    """

    is_transposed = True  # read by PEFT: an expert LoRA's factors are laid out for [E, in, out], as on GptOssExperts

    def __init__(self, num_experts, hidden_size, intermediate_size, limit, alpha, dtype=torch.bfloat16, device=None):
        super().__init__()
        block, half = mxfp4.BLOCK_SIZE, mxfp4.BLOCK_SIZE // 2
        if hidden_size % block or intermediate_size % block:
            raise ValueError(f"MXFP4 experts need hidden and intermediate sizes that are multiples of {block}, got "
                             f"{hidden_size} and {intermediate_size}")
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.limit, self.alpha = limit, alpha
        e, h, i = num_experts, hidden_size, intermediate_size
        u8 = dict(dtype=torch.uint8, device=device)
        self.register_buffer("gate_up_proj_blocks", torch.empty(e, 2 * i, h // block, half, **u8))
        self.register_buffer("gate_up_proj_scales", torch.empty(e, 2 * i, h // block, **u8))
        self.register_buffer("down_proj_blocks", torch.empty(e, h, i // block, half, **u8))
        self.register_buffer("down_proj_scales", torch.empty(e, h, i // block, **u8))
        # frozen like the packed weights (an adapter trains next to them, never them)
        self.gate_up_proj_bias = torch.nn.Parameter(torch.empty(e, 2 * i, dtype=dtype, device=device),
                                                    requires_grad=False)
        self.down_proj_bias = torch.nn.Parameter(torch.empty(e, h, dtype=dtype, device=device), requires_grad=False)
        # Empty stand-ins for GptOssExperts' bf16 weights: PEFT finds the parameters an expert LoRA targets by name
        # (target_parameters "mlp.experts.gate_up_proj"), and its wrapper takes their device and dtype; the LoRA
        # itself runs as low-rank terms (expert_lora.ParamWrapper). Registered in GptOssExperts' order, so
        # that PEFT nests the two wrappers, and names the adapter's tensors, as it does on bf16 experts.
        for name in LORA_TARGETS:
            self.register_parameter(name, torch.nn.Parameter(torch.empty(0, dtype=dtype, device=device),
                                                             requires_grad=False))
        self.decode_kernel = None  # chosen on the first decode step, once the weights are in place (choose_dense_kernel)
        self.decode_scales = None  # (what they were made from, the scales as the decode kernel reads them)

    @classmethod
    def like(cls, experts, device=None):
        """An empty Mxfp4Experts of the shape of a GptOssExperts (or its config's), biases in its dtype."""
        return cls(experts.num_experts, experts.hidden_size, experts.intermediate_size, experts.limit, experts.alpha,
                   dtype=experts.gate_up_proj_bias.dtype, device=device)

    def extra_repr(self):
        return (f"experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
                "weights=mxfp4")

    def matrices(self):
        """(gate_up, down) as (blocks, scales) pairs."""
        return ((self.gate_up_proj_blocks, self.gate_up_proj_scales), (self.down_proj_blocks, self.down_proj_scales))

    def dense_kernel(self):
        """This module's decode kernel (choose_dense_kernel over both matrices' scales; a host sync, once)."""
        if self.decode_kernel is None:
            self.decode_kernel = choose_dense_kernel(self.gate_up_proj_scales, self.down_proj_scales)
        return self.decode_kernel

    def kernel_scales(self):
        """(gate_up, down) scales as the decode kernel reads them: for 'transposed' a copy in its layout
        (scales_for_transposed; 1/32 of a byte a weight: ~23 MiB a layer, 0.56 GiB over the 20b shape's 24 layers),
        kept so that no decode step copies them, and made again when the scales change (new values written in
        place, new tensors, another device); else (None, None): the kernels read the scales as they are."""
        if self.dense_kernel() != "transposed":
            return None, None
        source = tuple((s.data_ptr(), getattr(s, "_version", None), s.device) for _, s in self.matrices())
        if self.decode_scales is None or self.decode_scales[0] != source:
            self.decode_scales = (source, tuple(scales_for_transposed(s) for _, s in self.matrices()))
        return self.decode_scales[1]

    def forward(self, hidden_states, router_indices=None, routing_weights=None, factors=None):
        """factors: an expert LoRA's low-rank terms (dense_forward says how), passed by expert_lora's wrapper."""
        rows = hidden_states.shape[0]
        tensors = [hidden_states] + [t for a, b, _ in (factors or {}).values() for t in (a, b)]
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)  # the dense kernels have none
        if hidden_states.is_cuda and rows <= DECODE_MAX_ROWS and not needs_grad:
            return dense_forward(self, hidden_states, router_indices, routing_weights, factors)
        return grouped_forward(self, hidden_states, router_indices, routing_weights, factors)


def swiglu(gate_up, limit, alpha):
    """transformers' GptOssExperts._apply_gate: interleaved gate/up halves, clamped, (up + 1) * gate * sigmoid
    (the rollout engine's bf16 experts use it too)."""
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


# -- many rows: grouped by expert, one matrix dequantised at a time ------------------------------------------------
def grouped_forward(experts, hidden_states, router_indices, routing_weights, factors=None):
    """The experts over token-expert pairs sorted by expert (prefill, training); differentiable in the input, the
    routing weights and an expert LoRA's factors (as dense_forward takes them). Returns [tokens, hidden] in the
    input's dtype."""
    factors = factors or {}
    tokens, top_k = router_indices.shape
    flat = router_indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    expert_of_row = flat[order]
    counts = expert_counts(flat, experts.num_experts)
    dtype = experts.gate_up_proj_bias.dtype
    unsort = torch.argsort(order)
    x = GatheredRows.apply(hidden_states, order, unsort, top_k).to(dtype)  # each token's row top_k times, by expert
    (gate_up_blocks, gate_up_scales), (down_blocks, down_scales) = experts.matrices()
    gate_up = Mxfp4GroupedMatmul.apply(x, counts, gate_up_blocks, gate_up_scales, experts.gate_up_proj_bias,
                                       expert_of_row)
    if "gate_up_proj" in factors:
        gate_up = gate_up + grouped_lora(x, counts, *factors["gate_up_proj"])
    if gate_up.is_cuda and grouped_matmul_kind() == "fused":  # the SwiGLU as two kernels too, saving gate_up alone
        from gpu_engine.swiglu_kernel import FusedSwiglu  # triton: a GPU extra, here where it runs

        act = FusedSwiglu.apply(gate_up, experts.limit, experts.alpha)
    else:
        act = swiglu(gate_up, experts.limit, experts.alpha)
    out = Mxfp4GroupedMatmul.apply(act, counts, down_blocks, down_scales, experts.down_proj_bias, expert_of_row)
    if "down_proj" in factors:
        out = out + grouped_lora(act, counts, *factors["down_proj"])
    out = out * routing_weights.reshape(-1).index_select(0, order)[:, None].to(out.dtype)
    # back to token order, then the top_k contributions of each token summed in fp32, as transformers' grouped_mm
    # experts sum them
    unsorted = GatheredRows.apply(out, unsort, order, 1)
    return unsorted.view(tokens, top_k, -1).sum(dim=1, dtype=torch.float32).to(hidden_states.dtype)


def expert_counts(flat, num_experts):
    """Rows routed to each expert ([E] int64) from the flat router indices, as a comparison summed: no host sync
    (torch.bincount on a GPU reads the largest index back first, which would stall every layer's forward)."""
    return (flat[:, None] == torch.arange(num_experts, device=flat.device)).sum(dim=0)


class GatheredRows(torch.autograd.Function):
    """x[index // repeats] for a permutation `index` of x's rows repeated `repeats` times (`inverse`: the inverse
    permutation), whose backward is a gather too: the gradient gathered back through `inverse`, and each row's
    `repeats` gradients summed in fp32 in a fixed order, rounded once. index_select's own backward scatters with
    atomic adds instead, in no fixed order: not reproducible where rows repeat."""

    @staticmethod
    def forward(ctx, x, index, inverse, repeats):
        ctx.save_for_backward(inverse)
        ctx.repeats = repeats
        return x.index_select(0, index // repeats if repeats > 1 else index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        grad = grad.index_select(0, inverse)
        if ctx.repeats > 1:
            grad = grad.view(-1, ctx.repeats, grad.shape[-1]).sum(dim=1, dtype=torch.float32).to(grad.dtype)
        return grad, None, None, None


class Mxfp4GroupedMatmul(torch.autograd.Function):
    """y = x W_e^T + bias_e for rows grouped by expert (counts[e] rows of expert e, in order; expert_of_row: each
    row's expert), W given as MXFP4 blocks and scales [E, out, in/32, ...], the bias frozen like W. Backward: the
    input gradient through the same packed weights, transposed; nothing but references to the packed bytes is
    saved (never a dequantised copy)."""

    @staticmethod
    def forward(ctx, x, counts, blocks, scales, bias, expert_of_row):
        if bias.requires_grad:
            raise ValueError("Mxfp4GroupedMatmul: the experts' biases are frozen with their packed weights; a bias "
                             "that requires a gradient gets none here")
        ctx.save_for_backward(counts, blocks, scales)
        return grouped_matmul(x, counts, blocks, scales, transpose=False, bias=bias, expert_of_row=expert_of_row)

    @staticmethod
    def backward(ctx, grad_out):
        counts, blocks, scales = ctx.saved_tensors
        grad_x = grouped_matmul(grad_out.contiguous(), counts, blocks, scales, transpose=True)
        return grad_x, None, None, None, None, None


def grouped_matmul(x, counts, blocks, scales, transpose, bias=None, expert_of_row=None):
    """x [rows, in] @ W_e^T (+ bias_e) per group (transpose=False), or x [rows, out] @ W_e (transpose=True, the
    backward; no bias). expert_of_row: each row's expert, for the bias.

    On a GPU, GROUPED_MATMUL (or the variable GROUPED_MATMUL_VARIABLE) chooses: 'fused' is one Triton kernel
    (`fused_grouped_matmul`); 'dequantize' dequantises the layer's matrix once ([E, out, in] bf16, freed when this
    returns), then multiplies by torch's grouped_mm where it is one fused kernel (`grouped_mm_fused`), else one
    matmul per expert (what torch's own grouped_mm does there too, after copying the offsets to the host). On a CPU
    each expert is dequantised in turn (exact in any float dtype)."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and grouped_matmul_kind() == "fused":
        return fused_grouped_matmul(x, counts, blocks, scales, transpose, bias)
    weights = dequantize(blocks, scales, x.dtype) if x.is_cuda else None
    if x.is_cuda and x.dtype == torch.bfloat16 and grouped_mm_fused(x.device):  # its CUDA dtype
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        out = torch.nn.functional.grouped_mm(x, weights if transpose else weights.transpose(-2, -1), offs=offsets)
    else:
        out_features = blocks.shape[-3] if not transpose else blocks.shape[-2] * mxfp4.BLOCK_SIZE
        out = x.new_empty(x.shape[0], out_features)
        start = 0
        for e, count in enumerate(counts.tolist()):
            if count:
                weight = weights[e] if weights is not None else mxfp4.dequantize_mxfp4(blocks[e], scales[e], x.dtype)
                rows = x[start:start + count]
                out[start:start + count] = rows @ weight if transpose else rows @ weight.t()
            start += count
    del weights  # the layer's bf16 matrix is freed before the bias' [rows, out] tensors are made, as it was when the
                 #   bias was added by the caller
    if bias is not None:
        out = out + bias.index_select(0, expert_of_row)
    return out


def fused_grouped_matmul(x, counts, blocks, scales, transpose, bias=None):
    """grouped_matmul as one Triton kernel (mxfp4_kernels.grouped_matmul_kernel): each program dequantises its
    weight tiles in registers and multiplies them by BLOCK_M rows of one expert, accumulating in fp32, the bias
    added before the one rounding to x's dtype. The row tiles come from the counts on the GPU: no host sync."""
    kernels = triton_kernels()
    experts, weight_rows, groups = scales.shape
    n, k = (groups * mxfp4.BLOCK_SIZE, weight_rows) if transpose else (weight_rows, groups * mxfp4.BLOCK_SIZE)
    if x.shape[-1] != k:
        raise ValueError(f"grouped_matmul: input has {x.shape[-1]} features, the weight takes {k}")
    if not all(t.is_contiguous() for t in (blocks, scales) + ((bias,) if bias is not None else ())):
        raise ValueError("grouped_matmul: the fused kernel reads the blocks, scales and bias as laid out in memory; "
                         "pass contiguous ones (the module's buffers are)")
    x = x.contiguous()
    rows = x.shape[0]
    offsets = torch.nn.functional.pad(torch.cumsum(counts, dim=0, dtype=torch.int32), (1, 0))
    out = x.new_empty(rows, n)

    def grid(tile):
        return triton_cdiv(n, tile["BLOCK_N"]), triton_cdiv(rows, tile["BLOCK_M"]) + experts

    kernels.grouped_matmul_kernel[grid](x, blocks, scales, bias if bias is not None else out, offsets, out,
                                        triton_next_power_of_2(max(1, rows // experts)), N=n, K=k,
                                        EXPERTS=experts, EXPERTS_PADDED=triton_next_power_of_2(experts),
                                        TRANSPOSE=transpose, HAS_BIAS=bias is not None)
    return out


def grouped_matmul_kind():
    """'fused' or 'dequantize': GROUPED_MATMUL, or the choice named in the variable GROUPED_MATMUL_VARIABLE."""
    choice = os.environ.get(GROUPED_MATMUL_VARIABLE, "").strip() or GROUPED_MATMUL
    if choice not in ("fused", "dequantize"):
        raise ValueError(f"{GROUPED_MATMUL_VARIABLE}={choice!r}: the grouped matmul is 'fused' or 'dequantize'; unset "
                         "it for the default")
    return choice


def grouped_lora(x, counts, a, b, scale):
    """scale * (x A_e) B_e for rows grouped by expert (counts[e] rows of expert e): an expert LoRA's term, two
    small matmuls per expert (A [E, in, r], B [E, r, out]), never A_e B_e; differentiable in x, A and B."""
    a, b = a.to(x.dtype), b.to(x.dtype)
    rank = a.shape[-1]
    if x.is_cuda and x.dtype == torch.bfloat16 and grouped_mm_fused(x.device) and rank % 8 == 0:
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)  # grouped_mm wants 16-byte rows: rank % 8 in bf16
        low = torch.nn.functional.grouped_mm(x, a.contiguous(), offs=offsets)
        return torch.nn.functional.grouped_mm(low, b.contiguous(), offs=offsets) * scale
    parts, start = [], 0
    for e, count in enumerate(counts.tolist()):
        parts.append(x[start:start + count] @ a[e] @ b[e])
        start += count
    return torch.cat(parts) * scale


def dequantize(blocks, scales, dtype):
    """MXFP4 blocks [..., G, 16] and scales [..., G] -> dtype [..., G * 32]: a Triton kernel on a GPU, else
    mxfp4.dequantize_mxfp4 (the same values: every MXFP4 value is exact in bf16 and fp32)."""
    if not blocks.is_cuda:
        return mxfp4.dequantize_mxfp4(blocks, scales, dtype)
    kernels = triton_kernels()
    out = torch.empty(*scales.shape[:-1], scales.shape[-1] * mxfp4.BLOCK_SIZE, dtype=dtype, device=blocks.device)
    n_blocks = scales.numel()
    grid = (triton_cdiv(n_blocks, DEQUANT_BLOCKS),)
    kernels.dequantize_kernel[grid](blocks, scales, out, n_blocks, BLOCKS=DEQUANT_BLOCKS)
    return out


# -- few rows: every token through every expert, weights dequantised in registers ---------------------------------
def dense_forward(experts, hidden_states, router_indices, routing_weights, factors=None):
    """Every token through every expert (a decode step: a few dozen tokens touch nearly every expert, so each
    weight is read once either way), routing weights applied after; no gradient.

    factors: {"gate_up_proj" | "down_proj": (A [E, in, r], B [E, r, out], scale)} of an expert LoRA, added as
    low-rank terms (nothing of the experts' size is built). Returns [tokens, hidden] in the input's dtype.
    """
    routing = routing_matrix(router_indices, routing_weights, experts.num_experts)
    return dense_experts(hidden_states, routing, dense_tensors(experts, hidden_states.is_cuda), factors)


def dense_tensors(experts, cuda=True):
    """What dense_experts reads of an Mxfp4Experts: its packed matrices, biases, SwiGLU constants, decode kernel and
    the scales laid out for it (chosen and made here, outside any compiled function: the choice reads the scales, a
    host sync, once per module)."""
    (gate_up_blocks, gate_up_scales), (down_blocks, down_scales) = experts.matrices()
    kernel = experts.dense_kernel() if cuda else "reference"
    laid_out = experts.kernel_scales() if cuda else (None, None)
    return (gate_up_blocks, gate_up_scales, experts.gate_up_proj_bias, down_blocks, down_scales,
            experts.down_proj_bias, experts.limit, experts.alpha, kernel, laid_out)


def dense_experts(h, routing, tensors, factors=None, combine_kernel=False, top_k=None):
    """dense_forward over tensors (`dense_tensors`) and a routing matrix (`routing_matrix`), not the module, so that
    the rollout engine's one compiled decode layer serves every layer: the matmuls are operators torch.compile
    leaves alone (`dense_matmul_op`, `gate_up_swiglu_op`); the SwiGLU (where the kernel does not compute it), LoRA
    terms, routing, and each matmul's input laid out for its kernel fuse around them. top_k (the router's experts
    a token): with the combine kernel, the 'transposed' kernel, no expert LoRA and more than ROUTED_ROW_TILE tokens
    (a GPU decode step), each expert multiplies only the tokens routed to it (`routed_experts`, DECODE_ROUTED)."""
    (gate_up_blocks, gate_up_scales, gate_up_bias, down_blocks, down_scales, down_bias, limit, alpha, kernel,
     (gate_up_laid_out, down_laid_out)) = tensors
    factors = factors or {}
    x = h.to(gate_up_bias.dtype)
    if (not factors and kernel == "transposed" and combine_kernel and DECODE_ROUTED and top_k is not None
            and x.shape[-2] > ROUTED_ROW_TILE):
        return routed_experts(h, routing, tensors, top_k, combine_kernel)
    if not factors and kernel_for_rows(kernel, x.shape[-2]) == "transposed":
        out = transposed_experts(kernel_input(x, "transposed"), tensors)
        return combine_experts(out, routing, h.dtype, combine_kernel)
    gate_up = matmul_laid_out(x, gate_up_blocks, gate_up_scales, gate_up_bias, kernel, gate_up_laid_out)
    if "gate_up_proj" in factors:  # [E, tokens, 2I]
        gate_up = add_lora(gate_up, x, factors["gate_up_proj"])
    act = swiglu(gate_up, limit, alpha)
    out = matmul_laid_out(act, down_blocks, down_scales, down_bias, kernel, down_laid_out)  # [E, tokens, H]
    if "down_proj" in factors:
        out = add_lora(out, act, factors["down_proj"])
    return combine_experts(out, routing, h.dtype, combine_kernel)


def transposed_experts(x, tensors, offsets=None, expert_rows=0):
    """Both expert matmuls with the 'transposed' kernel, x laid out for it (`kernel_input`): the SwiGLU in the gate_up
    kernel's last step, written as the down kernel reads its input (no gate_up matrix in memory, no activation
    kernel, no layout copy; an expert LoRA needs its term between the two, so dense_experts takes the other path
    then). offsets, expert_rows: each expert's routed rows (launch_dense; routed_experts)."""
    (gate_up_blocks, gate_up_scales, gate_up_bias, down_blocks, down_scales, down_bias, limit, alpha, _,
     (gate_up_laid_out, down_laid_out)) = tensors
    act = torch.ops.gpt_oss_mxfp4.gate_up_swiglu(x, gate_up_blocks, laid_out_or_made(gate_up_scales, gate_up_laid_out),
                                                 gate_up_bias, limit, alpha, offsets, expert_rows)
    return torch.ops.gpt_oss_mxfp4.dense_matmul(act, down_blocks, laid_out_or_made(down_scales, down_laid_out),
                                                down_bias, "transposed", offsets, expert_rows)


def routed_rows(routing, capacity):
    """Where each (token, expert) pair of a routed decode step sits, from a routing matrix [tokens, E] (a token is
    routed to the experts it weighs by more than 0; `routing_matrix`): the pairs grouped by expert, each expert's
    tokens in order, in `capacity` rows (tokens x top k; rows past the pairs unused).

    Returns (token_of [capacity]: each row's token, 0 in unused rows; rows [tokens, E] int32: the row of (t, e)
    where t is routed to e, else 0; offsets [E + 1] int32: expert e's rows are offsets[e] .. offsets[e + 1]).
    Static shapes and elementwise work only, so a CUDA graph holds it; compiled, a few small fused kernels."""
    routed = (routing != 0).to(torch.int32)
    offsets = torch.nn.functional.pad(torch.cumsum(routed.sum(dim=0, dtype=torch.int32), 0, dtype=torch.int32), (1, 0))
    rank = torch.cumsum(routed, dim=0, dtype=torch.int32) - routed  # tokens before t routed to e
    rows = torch.where(routed != 0, offsets[:-1] + rank, 0)
    place = torch.arange(capacity, device=routing.device)
    hit = (routed[None] != 0) & (rows[None] == place[:, None, None])  # [capacity, tokens, E]
    token = torch.arange(routed.shape[0], device=routing.device)
    token_of = (hit * token[None, :, None]).sum(dim=(1, 2))
    return token_of, rows, offsets


def routed_experts(h, routing, tensors, top_k, combine_kernel=False):
    """dense_experts' result with each expert multiplying only the tokens routed to it (top_k of E per token: 4 of
    32 in gpt-oss, where dense_experts multiplies every token by every expert): the routed (token, expert) pairs'
    rows gathered, grouped by expert (`routed_rows`: tokens x top_k rows), the 'transposed' kernel told where each
    expert's rows are (ROUTED_ROW_TILE rows a program, programs past an expert's rows idle), the outputs read back
    from each token's rows by combine_experts. Each weight byte is still read once where an expert has any token.
    The same products as dense_experts for every routed pair; on a CPU the reference path computes every row with
    its expert's weights. No expert LoRA (dense_experts adds those)."""
    (gate_up_blocks, gate_up_scales, gate_up_bias, down_blocks, down_scales, down_bias, limit, alpha, kernel,
     (gate_up_laid_out, down_laid_out)) = tensors
    token_of, rows, offsets = routed_rows(routing, h.shape[0] * top_k)
    x = h.to(gate_up_bias.dtype)
    if kernel == "transposed":
        # [tokens x top_k, in]: compiled, one gather with the layout's copy
        out = transposed_experts(kernel_input(x, kernel)[token_of], tensors, offsets, h.shape[0])
    else:
        act = swiglu(launch_dense(kernel_input(x[token_of], kernel), gate_up_blocks, gate_up_scales, gate_up_bias,
                                  kernel, offsets=offsets), limit, alpha)
        out = launch_dense(kernel_input(act, kernel), down_blocks, down_scales, down_bias, kernel, offsets=offsets)
    return combine_experts(out, routing, h.dtype, combine_kernel, rows)


def add_lora(y, x, factor):
    """y + scale * (x A_e) B_e for every expert e: an expert LoRA's term in a dense path (this module's and the
    rollout engine's bf16 one), never A_e B_e. y [E, tokens, out]; x [E, tokens, in], or [tokens, in] shared by
    every expert; factor (A [E, in, r], B [E, r, out], scale).

    In y's dtype, rounded as training rounds it (`grouped_lora`: x A, then its product with B, then the scale). With
    shared rows, x A for all experts is one matmul against PEFT's own lora_A layout [E * r, in], with no copy of
    the rows per expert.
    """
    a, b, scale = factor
    experts, inputs, rank = a.shape
    a_rows = a.transpose(1, 2).reshape(experts * rank, inputs).to(y.dtype)  # a view where A is PEFT's own tensor
    x = x.to(y.dtype)
    if x.dim() == 2:
        low = torch.mm(x, a_rows.t()).view(x.shape[0], experts, rank).transpose(0, 1)  # [E, tokens, r]
    else:
        low = torch.bmm(x, a_rows.view(experts, rank, inputs).transpose(1, 2))
    return y + torch.bmm(low, b.to(y.dtype)) * scale


def routing_matrix(index, scores, experts):
    """A router's top-k (`index`, `scores` [tokens, k]) as the dense paths read it: [tokens, experts], each token's
    routing weight for every expert (zero outside its top k)."""
    routing = torch.zeros(index.shape[0], experts, dtype=scores.dtype, device=scores.device)
    return routing.scatter(1, index, scores)


def combine_experts(out, routing, dtype, kernel=False, rows=None):
    """Every expert's output out [E, tokens, hidden] weighted by each token's routing weight for it (`routing`
    [tokens, E], zero for an expert outside its top k), each product rounded to out's dtype, summed in fp32 ->
    [tokens, hidden] in `dtype`. rows [tokens, E] (`routed_rows`): out is instead [pairs, hidden], token t's output
    of expert e in row rows[t, e], and rows no token is routed to may hold anything. kernel: one Triton kernel that
    reads only the routed experts' rows (combine_experts_op; the rollout engine's decode step on a GPU, bf16), else
    plain torch."""
    routing = routing.to(out.dtype)
    if kernel and out.dtype == dtype:
        return torch.ops.gpt_oss_engine.combine_experts(out, routing, rows)
    if rows is not None:  # [E, tokens, hidden] again; an unrouted pair's row may hold anything, even NaN
        out = torch.where((routing.t() != 0)[:, :, None], out[rows.t().to(torch.int64)], 0)
    weighted = out * routing.t()[:, :, None]
    return weighted.sum(dim=0, dtype=torch.float32).to(dtype)


@torch.library.custom_op("gpt_oss_engine::combine_experts", mutates_args=())
def combine_experts_op(out: torch.Tensor, routing: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """combine_experts as one operator around combine_experts_kernel (torch.compile calls it as it is)."""
    from gpu_engine import combine_experts_kernel  # triton: a GPU extra, checked by the engine before this is chosen

    tokens, experts = routing.shape
    hidden = out.shape[-1]
    out, routing = out.contiguous(), routing.contiguous()
    result = out.new_empty(tokens, hidden)
    block = combine_experts_kernel.BLOCK
    combine_experts_kernel.combine_experts_kernel[(triton_cdiv(hidden, block), tokens)](
        out, routing, routing if rows is None else rows.to(torch.int32).contiguous(), result, tokens, hidden,
        EXPERTS=experts, EXPERTS_PADDED=triton_next_power_of_2(experts), BLOCK=block, ROWS=rows is not None)
    return result


@combine_experts_op.register_fake
def combine_experts_shape(out, routing, rows=None):
    return out.new_empty(routing.shape[0], out.shape[-1])


def matmul_laid_out(x, blocks, scales, bias, kernel, laid_out_scales=None):
    """x W_e^T + bias_e through the operator, x laid out for the kernel here, in the caller's code: compiled, the
    permutation and cast join the kernel that made x, instead of two copies of their own before each matmul.
    laid_out_scales: the scales in the 'transposed' kernel's layout where the caller keeps them
    (Mxfp4Experts.kernel_scales), else they are laid out here (a copy: 1/32 of a byte a weight)."""
    kernel = kernel_for_rows(kernel, x.shape[-2])
    if kernel == "transposed":
        scales = laid_out_or_made(scales, laid_out_scales)
    return torch.ops.gpt_oss_mxfp4.dense_matmul(kernel_input(x, kernel), blocks, scales, bias, kernel)


def laid_out_or_made(scales, laid_out):
    """The 'transposed' kernel's scales: the caller's kept copy, else one made now."""
    return laid_out if laid_out is not None else scales_for_transposed(scales)


@torch.library.custom_op("gpt_oss_mxfp4::dense_matmul", mutates_args=())
def dense_matmul_op(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor,
                    kernel: str, offsets: Optional[torch.Tensor] = None, expert_rows: int = 0) -> torch.Tensor:
    """The decode matmul as one operator: torch.compile calls it as it is (Triton launches, TMA descriptors and all).
    x: `kernel_input(x, kernel)`; scales: for 'transposed' `scales_for_transposed(scales)`; kernel: a decode kernel
    chosen beforehand (`kernel_for_rows`), or 'reference' for the plain-torch path of a CPU; offsets: see
    launch_dense. Returns [E, tokens, out] (with offsets [rows, out]) in the bias' dtype."""
    if kernel == "reference" and x.is_cuda:
        raise ValueError("dense_matmul: the 'reference' path is a CPU's; on a GPU pass the decode kernel "
                         "(Mxfp4Experts.dense_kernel())")
    return launch_dense(x, blocks, scales, bias, kernel, offsets=offsets, expert_rows=expert_rows)


@dense_matmul_op.register_fake
def dense_matmul_shape(x, blocks, scales, bias, kernel, offsets=None, expert_rows=0):
    if offsets is not None:
        return x.new_empty(x.shape[0], blocks.shape[1], dtype=bias.dtype)
    return x.new_empty(blocks.shape[0], x.shape[-2], blocks.shape[1], dtype=bias.dtype)


@torch.library.custom_op("gpt_oss_mxfp4::gate_up_swiglu", mutates_args=())
def gate_up_swiglu_op(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor, limit: float,
                      alpha: float, offsets: Optional[torch.Tensor] = None, expert_rows: int = 0) -> torch.Tensor:
    """swiglu(x W_e^T + bias_e) for the gate_up matrix with the 'transposed' kernel, laid out as the down matrix's
    call reads it: `kernel_input(swiglu(...), 'transposed')`, [E, tokens, out / 2] fp16, made in the kernel's last
    step. x and scales laid out as for dense_matmul_op."""
    return launch_dense(x, blocks, scales, bias, "transposed", swiglu=(limit, alpha), offsets=offsets,
                        expert_rows=expert_rows)


@gate_up_swiglu_op.register_fake
def gate_up_swiglu_shape(x, blocks, scales, bias, limit, alpha, offsets=None, expert_rows=0):
    if offsets is not None:
        return x.new_empty(x.shape[0], blocks.shape[1] // 2, dtype=torch.float16)
    return x.new_empty(blocks.shape[0], x.shape[-2], blocks.shape[1] // 2, dtype=torch.float16)


def dense_matmul(x, blocks, scales, bias, kernel=None):
    """x [tokens, in] (the same rows for every expert) or [E, tokens, in] -> [E, tokens, out] = x W_e^T + bias_e.

    On a GPU one Triton kernel (`kernel`, default DENSE_KERNEL; 'auto' asks choose_dense_kernel, a host sync): each
    program dequantises tiles of one expert's weight in registers and multiplies them on the tensor cores,
    accumulating in fp32 (tile shapes autotuned once per weight shape). On a CPU the reference: dequantised
    weights, a batched matmul."""
    in_features = blocks.shape[2] * mxfp4.BLOCK_SIZE
    if x.shape[-1] != in_features:
        raise ValueError(f"dense_matmul: input has {x.shape[-1]} features, the weight takes {in_features}")
    if not x.is_cuda:
        kernel = "reference"
    else:
        kernel = kernel or DENSE_KERNEL
        if kernel == "auto":
            kernel = choose_dense_kernel(scales)
    return matmul_laid_out(x, blocks, scales, bias.to(x.dtype), kernel)


def kernel_for_rows(kernel, tokens):
    """The decode kernel that runs for `tokens` rows: 'transposed' holds them all in one tile, so above
    TRANSPOSED_MAX_ROWS 'blocked' runs instead."""
    return "blocked" if kernel == "transposed" and tokens > TRANSPOSED_MAX_ROWS else kernel


def kernel_input(x, kernel):
    """x [..., tokens, in] as `kernel` reads it, in the same shape: 'transposed': fp16, each 32-input block permuted
    (`permute_for_transposed`); 'blocked': fp16, each row's even inputs, then its odd ones; else as it is."""
    if kernel == "transposed":
        return permute_for_transposed(x).to(torch.float16)
    if kernel == "blocked":
        halves = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2).transpose(-1, -2)
        return halves.to(torch.float16).reshape(x.shape)
    return x


def launch_dense(x, blocks, scales, bias, kernel, swiglu=None, offsets=None, expert_rows=0):
    """dense_matmul's work on x (and for 'transposed' the scales) already laid out for `kernel` (`kernel_input`,
    `scales_for_transposed`): the Triton kernel, or on a CPU ('reference') the dequantised weights in a batched
    matmul. Output in the bias' dtype; with swiglu = (limit, alpha) ('transposed' only) the activation of the
    output instead, laid out for the next call (gate_up_swiglu_op). offsets [E + 1] (int32, `routed_rows`; the
    'transposed' kernel or a CPU's reference): x [rows, in] holds the rows of expert e in rows offsets[e] ..
    offsets[e + 1], each multiplied by its own expert only, into out [rows, out]; rows past offsets[E] are left
    unwritten by the kernel (the reference computes them with the last expert). expert_rows: the most rows an
    expert can have (a step's tokens; 0: all rows): the kernel's programs per expert."""
    experts, out_features = blocks.shape[0], blocks.shape[1]
    in_features = blocks.shape[2] * mxfp4.BLOCK_SIZE
    shared = x.dim() == 2
    tokens = x.shape[-2]
    if swiglu is not None and kernel != "transposed":
        raise ValueError(f"dense_matmul: only the 'transposed' kernel computes the SwiGLU, got '{kernel}'")
    if kernel in ("transposed", "blocked") and x.dtype != torch.float16:
        raise ValueError(f"dense_matmul: the '{kernel}' kernel reads fp16 inputs laid out for it, got {x.dtype}; "
                         "pass kernel_input(x, kernel)")
    if offsets is not None and (kernel not in ("transposed", "reference") or not shared):
        raise ValueError(f"dense_matmul: offsets (each expert's routed rows) need rows [rows, in] and the 'transposed' "
                         f"kernel (or a CPU's reference), got {list(x.shape)} and '{kernel}'")
    if kernel == "transposed" and offsets is None and tokens > TRANSPOSED_MAX_ROWS:
        raise ValueError(f"dense_matmul: the 'transposed' kernel holds at most {TRANSPOSED_MAX_ROWS} rows, got "
                         f"{tokens}; choose the kernel with kernel_for_rows")
    groups = in_features // mxfp4.BLOCK_SIZE
    if kernel == "transposed" and tuple(scales.shape) != (experts, groups, padded_row(out_features)):
        raise ValueError(f"dense_matmul: the 'transposed' kernel reads scales laid out for it, [{experts}, {groups}, "
                         f"{padded_row(out_features)}], got {list(scales.shape)}; pass scales_for_transposed(scales)")
    if kernel == "reference" and offsets is not None:
        weight = mxfp4.dequantize_mxfp4(blocks, scales, x.dtype)  # [E, out, in]
        expert = torch.bucketize(torch.arange(tokens, device=x.device), offsets[1:].to(torch.int64), right=True)
        expert = expert.clamp(max=experts - 1)  # each row's expert
        out = torch.bmm(x[:, None], weight[expert].transpose(1, 2))[:, 0] + bias[expert].to(x.dtype)
        return out.to(bias.dtype)
    if kernel == "reference":
        weight = mxfp4.dequantize_mxfp4(blocks, scales, x.dtype)  # [E, out, in]
        inputs = x.unsqueeze(0).expand(experts, -1, -1) if shared else x
        return (torch.bmm(inputs, weight.transpose(1, 2)) + bias[:, None].to(x.dtype)).to(bias.dtype)
    kernels = triton_kernels()
    rows_out = (tokens,) if offsets is not None else (experts, tokens)
    if swiglu is None:
        out = torch.empty(*rows_out, out_features, dtype=bias.dtype, device=x.device)
    else:
        out = torch.empty(*rows_out, out_features // 2, dtype=torch.float16, device=x.device)
    # one row tile for up to KERNEL_MAX_BLOCK_M rows: each further tile dequantises every weight again
    block_m = max(16, triton_next_power_of_2(min(tokens, KERNEL_MAX_BLOCK_M)))
    if offsets is not None:
        block_m = ROUTED_ROW_TILE

    def grid(tile):
        return triton_cdiv(out_features, tile["BLOCK_N"]), experts, triton_cdiv(expert_rows or tokens, block_m)

    x = x.contiguous()
    if kernel == "transposed":
        from triton.tools.tensor_descriptor import TensorDescriptor  # triton: a GPU extra, here where it runs

        # rows of all experts stacked; tile shapes are placeholders: the autotuner's pre-hook sets those it runs
        x_desc = TensorDescriptor.from_tensor(x.reshape(-1, in_features), [block_m, 128])
        w_desc = TensorDescriptor.from_tensor(blocks.view(experts * out_features, in_features // 2), [64, 64])
        # [E * groups, out] over rows padded to 16 bytes: the padding lies outside the shape, so TMA reads zeros there
        s_desc = TensorDescriptor(scales, [experts * groups, out_features], [scales.shape[-1], 1], [8, 64])
        # one row tile (all rows), or with offsets one program per ROUTED_ROW_TILE rows an expert may have (the
        # tokens of a step, at most: programs past an expert's rows return at once)
        kernels.transposed_matmul_kernel[lambda tile: grid(tile) if offsets is not None else grid(tile)[:2]](
            x_desc, w_desc, s_desc, bias, out, bias if offsets is None else offsets, tokens, out_features,
            0 if shared else tokens, *(swiglu or (0.0, 0.0)), K=in_features, BLOCK_M=block_m,
            SWIGLU=swiglu is not None, ROUTED=offsets is not None)
    elif kernel == "blocked":  # each row [2, in / 2]: even inputs, then odd ones
        kernels.blocked_matmul_kernel[grid](x, blocks, scales, bias, out, tokens, out_features,
                                            0 if shared else x.stride(0), x.stride(-2), K=in_features,
                                            BLOCK_M=block_m)
    else:
        kernels.dense_matmul_kernel[grid](x, blocks, scales, bias, out, tokens, out_features,
                                          0 if shared else x.stride(0), x.stride(-2), K=in_features, BLOCK_M=block_m)
    return out


def permute_for_transposed(x):
    """[..., in] -> the same values with each block of 32 inputs reordered as transposed_matmul_kernel multiplies
    them: position 16h + 8j + 2c + i holds input 8c + 4j + 2i + h (c < 4; j, i, h < 2), i.e. nibble h of byte
    4c + 2j + i of the block's 16 bytes. A thread of the tensor cores' operand layout holds positions 2c, 2c + 1,
    2c + 8, 2c + 9 and the same + 16: the 8 codes of its block's bytes 4c .. 4c + 3, each register a pair of
    neighbouring bytes' low (or high) nibbles, as the hardware's e4m3 pair conversion writes them."""
    shape = x.shape
    blocks = x.reshape(*shape[:-1], shape[-1] // 32, 4, 2, 2, 2)  # [..., block, c, j, i, h]
    return blocks.permute(*range(blocks.dim() - 4), -1, -3, -4, -2).reshape(shape)


def padded_row(n):
    """n bytes rounded up to 16: TMA reads rows whose stride is a multiple of 16 bytes."""
    return -(-n // 16) * 16


def scales_for_transposed(scales):
    """Scales [E, out, in / 32] -> [E, in / 32, out rounded up to 16] as transposed_matmul_kernel reads them: one row
    per block of inputs, so that a tile's scales are one TMA copy beside its weight bytes (the rows padded to 16
    bytes for TMA; the kernel's shape stops short of the padding, which it never reads)."""
    experts, out_features, groups = scales.shape
    laid_out = scales.new_zeros(experts, groups, padded_row(out_features))
    laid_out[:, :, :out_features] = scales.transpose(1, 2)
    return laid_out


def choose_dense_kernel(*scales):
    """DENSE_KERNEL, or for 'auto' the fastest kernel that is exact for weights with these scales on their GPU:
    'transposed' on Hopper or newer (wgmma, TMA) when every scale byte lies in TRANSPOSED_SCALE_BYTES, else
    'blocked'. Reads the scales' range: a host sync, so call it once per weight (Mxfp4Experts.dense_kernel)."""
    if DENSE_KERNEL != "auto":
        return DENSE_KERNEL
    low, high = TRANSPOSED_SCALE_BYTES
    fits = all(low <= s.min().item() and s.max().item() <= high for s in scales)
    hopper = gpu_capability(scales[0].device)[0] == 9  # where it has run; it compiles for sm_89 and sm_120 too
    return "transposed" if hopper and fits else "blocked"


def gpu_capability(device=None):
    """The compute capability (major, minor) the GPU code plans for: the card's, or a lower one named in the
    environment variable GPU_CAPABILITY_VARIABLE (e.g. 8.6), with which a Hopper card takes the paths an Ampere or
    Ada card takes (no 'transposed' kernel, no TMA, grouped matmuls as a loop): tests and benchmarks of those paths."""
    actual = torch.cuda.get_device_capability(device)
    forced = os.environ.get(GPU_CAPABILITY_VARIABLE, "").strip()
    if not forced:
        return actual
    try:
        major, minor = (int(part) for part in forced.split("."))
    except ValueError:
        raise ValueError(f"{GPU_CAPABILITY_VARIABLE}={forced!r} is not a compute capability like 8.0 or 8.6; unset it "
                         "to use the card's own") from None
    return min((major, minor), actual)


def grouped_mm_fused(device):
    """Whether torch's grouped_mm is one fused kernel on `device`: its CUTLASS kernel, for compute capability 9 and
    10 (torch >= 2.10, aten/src/ATen/native/cuda/GroupedBlas.cpp). Elsewhere torch copies the offsets to the host and
    loops over the groups (a host sync, which a CUDA graph cannot hold); this module then loops itself."""
    return hasattr(torch.nn.functional, "grouped_mm") and gpu_capability(device)[0] in (9, 10)


# -- the Triton kernels (mxfp4_kernels.py; triton is a GPU extra) -----------------------------------------------
def triton_cdiv(a, b):
    return -(-a // b)


def triton_next_power_of_2(n):
    return 1 << max(0, (n - 1).bit_length())


def triton_kernels():
    """mxfp4_kernels (compiled on first launch); a clear error where triton is missing."""
    try:
        from gpu_engine import mxfp4_kernels
    except ImportError as error:
        raise RuntimeError(f"MXFP4 experts on a GPU need triton ({error}; it ships with CUDA builds of torch, or pip "
                           "install triton), or load the model with --experts-format bf16") from None
    return mxfp4_kernels


# -- replacing a model's experts -----------------------------------------------------------------------------------
def is_mxfp4_experts(module):
    return isinstance(module, Mxfp4Experts)


def expert_weight_count(config):
    """Values in a gpt-oss config's expert weights, all layers (gate_up: 2 x hidden x inter, down: inter x hidden)."""
    return config.num_hidden_layers * config.num_local_experts * 3 * config.hidden_size * config.intermediate_size


def packed_expert_bytes(config):
    """Bytes of a gpt-oss config's expert weights as MXFP4 blocks and scales (biases not counted)."""
    values = expert_weight_count(config)
    return values // 2 + values // mxfp4.BLOCK_SIZE
