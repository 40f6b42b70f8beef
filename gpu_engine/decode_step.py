"""One decode step of the rollout engine, layer by layer: the weights it reads (attention stacked with the LoRA's A
rows, an expert LoRA's factors) and its functions over tensors, plain or compiled by torch.compile.

    weights = decode_step.gather_weights(lm.model, torch.bfloat16)   # EngineWeights, refreshed in place by copy_from
    kernels = decode_step.DecodeKernels("inductor", triton_kernels=True)
    q = kernels.attention_inputs(...); x = kernels.finish_layer(...)  # per layer, inside the engine's CUDA graph

The functions take tensors, not modules, so that one compiled function serves every layer (rollout_engine.py says
how the step is put together and why).
"""

from typing import NamedTuple

import torch

from gpu_engine.expert_lora import expert_lora_factors
from gpu_engine.mxfp4_experts import (add_lora, combine_experts, dense_experts as mxfp4_dense_experts,
                                      dense_tensors as mxfp4_dense_tensors, is_mxfp4_experts, swiglu)

# -----------------------------------------------------------------------------
COMPILE_OPTIONS = {"emulate_precision_casts": True}  # inductor: round every intermediate to its eager dtype, so a
                                                    #   fused kernel computes what the separate kernels computed
# -----------------------------------------------------------------------------


class Projection(NamedTuple):
    """A linear layer as the engine runs it: weight [out + R, in]: the layer's weight with its LoRA factor A [R, in]
    stacked under it (R = 0 without a live adapter), so that one matmul gives both the output and x A^T; bias
    [out + R] (zeros for A's rows); lora_b [out, R]: B times the adapter's scale, or None. Fused q/k/v: the three
    stacked, then their A rows, B block-diagonal."""
    weight: torch.Tensor
    bias: torch.Tensor
    lora_b: torch.Tensor | None = None

    def tensors(self):
        return [t for t in self if t is not None]


class LayerWeights:
    """One layer's weights as the decode step reads them. The attention's and an expert LoRA's are refreshed copies
    (EngineWeights); `moe` holds the model's own router and expert tensors, read in place: (router weight, router
    bias, top k, the dense experts function, its tensors: `expert_tensors` or mxfp4_experts.dense_tensors)."""

    def __init__(self, qkv, o, input_norm, post_norm, moe, expert_lora=None):
        self.qkv, self.o = qkv, o  # Projection
        self.input_norm, self.post_norm = input_norm, post_norm  # (fp32 weight, eps)
        self.moe = moe
        self.expert_lora = expert_lora  # `expert_lora_copies` of a live expert LoRA, or None

    def tensors(self):
        lora = [t for a, b, _ in (self.expert_lora or {}).values() for t in (a, b)]
        return self.qkv.tensors() + self.o.tensors() + [self.input_norm[0], self.post_norm[0]] + lora


class EngineWeights:
    """Every layer's LayerWeights; `copy_from` refreshes them in place (the captured graphs keep their addresses)."""

    def __init__(self, layers):
        self.layers = layers

    def tensors(self):
        return [t for layer in self.layers for t in layer.tensors()]

    def copy_from(self, fresh):
        for kept, new in zip(self.tensors(), fresh.tensors(), strict=True):
            if kept.shape != new.shape:
                raise RuntimeError("the adapter's shape changed under the rollout engine; make a new RolloutEngine")
            if kept.data_ptr() != new.data_ptr():  # a model parameter used as is needs no copy
                kept.copy_(new)


# -- pure helpers ------------------------------------------------------------------------------------------------
def rms_norm(x, weight, eps):
    """transformers' GptOssRMSNorm (fp32 statistics, fp32 weight, back to x's dtype) as one fused op where torch has
    one; `weight` is the norm's weight already in fp32."""
    return torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), weight, eps).to(x.dtype)


def project(x, weight, bias, lora_b=None):
    """x [tokens, in] through a Projection's tensors: bias + x W^T, plus the LoRA term (x A^T) B^T with the scale
    in B, x A^T coming out of the same matmul as x W^T (A's rows stacked under W: one matmul a projection, where a
    separate x A^T was one more small kernel in every decode step).

    Rounded as PEFT's LoRA layer under the trainer's bf16 autocast rounds it: the base output, x A^T, the term,
    then their sum (the scale, alpha / r, is a power of two in the usual configurations, so folding it into B
    changes nothing)."""
    out = torch.addmm(bias, x, weight.t())
    if lora_b is None:
        return out
    outputs = lora_b.shape[0]
    return out[:, :outputs] + torch.mm(out[:, outputs:], lora_b.t())


def project_rows(x, weight, bias, lora_b=None):
    """`project` for a decode step's few rows, with the same roundings: the LoRA term (x A^T) B^T as
    `linear_as_reduction`, which compiled reads x A^T where the matmul left it and joins the sum with the output
    in one small kernel (a matmul would take a copy of that slice of the output first, then a library call)."""
    out = torch.addmm(bias, x, weight.t())
    if lora_b is None:
        return out
    outputs = lora_b.shape[0]
    return out[:, :outputs] + linear_as_reduction(out[:, outputs:], lora_b)


def linear_as_reduction(x, weight, bias=None):
    """x [rows, in] W^T (+ bias) for a weight of few rows [out, in], as a matmul computes it (fp32 products and sums,
    the bias added in fp32, rounded once to x's dtype), written as an elementwise product summed: compiled, one
    small reduction kernel (summed in another order than a matmul's, within fp32 rounding)."""
    out = (x.float()[:, None, :] * weight.float()[None]).sum(dim=-1)
    return (out if bias is None else out + bias.float()).to(x.dtype)


def apply_rope(x, cos, sin):
    """Rotary embedding as transformers' gpt-oss applies it (the two halves of each head rotated by the position's
    angle), written as x * [cos, cos] + swap_halves(x) * [-sin, sin] with the tables from `_ensure_rope`: the same
    products and sums, so the same bf16 roundings (a fused multiply-add would round once less, and differ)."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin


def additive_mask(allowed, dtype):
    """Boolean 'may attend' -> 0 / dtype minimum, the additive mask transformers' eager attention uses."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed,
                                                                                       torch.finfo(dtype).min)


def expand_mask(mask, kv_heads):
    """[rows, keys] -> [rows * kv_heads, 1, keys], contiguous: the layout `attend_one` adds to its scores."""
    rows, keys = mask.shape
    return mask[:, None, None].expand(rows, kv_heads, 1, keys).reshape(rows * kv_heads, 1, keys)


def attend(q, k, v, mask, sinks, scaling):
    """Grouped-query attention with learned sinks, in the dtypes of transformers' eager gpt-oss attention (prefill).

    Logits are [kv, groups, queries, keys] against a [1, kv, keys, d] k/v; `sinks` broadcasts against the logits
    without the keys dim: one more logit per head that takes probability mass and contributes no value.
    """
    logits = torch.matmul(q, k.transpose(-1, -2)) * scaling + mask
    sink = sinks.unsqueeze(-1).expand(*logits.shape[:-1], 1).to(logits.dtype)
    combined = torch.cat([logits, sink], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = torch.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]
    return torch.matmul(probs.to(v.dtype), v)


class Keys(NamedTuple):
    """The cached keys a decode step's rows attend to, for one kind of layer: the additive mask [rows * kv, 1, keys]
    that the plain path adds to its scores (None when the kernel runs), and what the kernel reads instead: each
    row's position [rows] (the one just written) and the layer's window (the cache length for a full-attention
    layer). kernel: whether the Triton kernels run (`DecodeKernels.triton_kernels`): this attention kernel, and the experts' combine kernel."""
    mask: torch.Tensor | None
    pos: torch.Tensor
    window: int
    kernel: bool


def attend_one(q, k_cache, v_cache, keys, sinks, scaling):
    """The decode step's attention, one query per row, in as few kernels as the math allows.

    q [rows * kv, groups, d] (a row's query groups are the rows of its kv head's matmul, so the cache is read as
    is, never broadcast); caches [rows, kv, keys, d]; keys: `Keys`; sinks [rows * kv, groups, 1].
    With keys.kernel, one Triton kernel (`decode_attention`). Else scores = q k^T * scaling + mask, rounded as
    transformers' eager attention rounds them, the sink as one more column of the softmax, the maximum subtracted
    in the logits' dtype as there. (Compiled, the scale, mask, sink and softmax are one kernel after the matmul; a
    baddbmm would first copy the mask out to every query group.)
    """
    if keys.kernel:
        return torch.ops.gpt_oss_engine.decode_attention(q, k_cache, v_cache, sinks, keys.pos, scaling, keys.window)
    batch, _, d = q.shape
    keys_cache = k_cache.view(batch, -1, d)
    scores = torch.bmm(q, keys_cache.transpose(1, 2)) * scaling + keys.mask
    combined = torch.cat([scores, sinks], dim=-1)
    probs = torch.softmax(combined - combined.amax(dim=-1, keepdim=True), dim=-1, dtype=combined.dtype)
    return torch.bmm(probs[..., :-1], v_cache.view(batch, -1, d))


@torch.library.custom_op("gpt_oss_engine::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, sinks: torch.Tensor,
                     pos: torch.Tensor, scaling: float, window: int) -> torch.Tensor:
    """attend_one's attention as one operator around decode_attention_kernel (torch.compile calls it as it is):
    each row's keys from max(0, pos - window + 1) to pos, read once, softmax online, the sink as a last logit."""
    from gpu_engine import decode_attention_kernel  # triton: a GPU extra, checked by has_triton() before it runs

    batch, groups, d = q.shape
    _, kv, length, _ = k_cache.shape
    if not (q.dtype == k_cache.dtype == v_cache.dtype == torch.bfloat16) or d < 16 or d & (d - 1):
        raise ValueError(f"decode_attention: the kernel takes bf16 queries and caches and a power-of-two head size "
                         f"of at least 16, got {q.dtype} / {k_cache.dtype} and {d}; use the plain path "
                         "(rollout_engine.DECODE_TRITON_KERNELS = False)")
    q, k_cache, v_cache = q.contiguous(), k_cache.contiguous(), v_cache.contiguous()
    out = torch.empty_like(q)
    decode_attention_kernel.decode_attention_kernel[(batch,)](
        q, k_cache, v_cache, sinks.contiguous(), pos, out, scaling, length, window, KV=kv, GROUPS=groups, D=d,
        BLOCK_G=max(16, 1 << (groups - 1).bit_length()), BLOCK_N=64)
    return out


@decode_attention.register_fake
def decode_attention_shape(q, k_cache, v_cache, sinks, pos, scaling, window):
    return q.new_empty(q.shape)  # contiguous, as the kernel writes it


def sample(logits, temperature, top_p, mode):
    """Next tokens [rows] and their log-probabilities under softmax(logits / temperature); logits fp32 [rows, vocab].

    Sampling is the exponential race (argmax of p / E, E ~ Exp(1)), which draws from p without a host sync.
    """
    logp = torch.log_softmax(logits / temperature, dim=-1)
    if mode == "greedy":
        token = logits.argmax(dim=-1)
    else:
        probs = logp.exp()
        if mode == "top_p":
            probs = nucleus(probs, top_p)
        token = (probs / torch.empty_like(probs).exponential_()).argmax(dim=-1)
    return token, logp.gather(1, token[:, None])[:, 0]


def nucleus(probs, top_p):
    """Zero every token outside the smallest set whose probability reaches top_p (the top token always stays)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


def gather_weights(core, dtype):
    """EngineWeights of a gpt-oss model (its `.model`): fused q/k/v, o, and the norms, read from the live modules."""
    layers = []
    for layer in core.layers:
        attn = layer.self_attn
        norms = [(norm.weight.float(), norm.variance_epsilon)
                 for norm in (layer.input_layernorm, layer.post_attention_layernorm)]
        router, experts = layer.mlp.router, find_base_layer(layer.mlp.experts)
        if is_mxfp4_experts(experts):  # their Triton kernels are one operator inside the compiled function
            dense = (mxfp4_dense_experts, mxfp4_dense_tensors(experts, experts.gate_up_proj_blocks.is_cuda))
        else:
            dense = (dense_experts, expert_tensors(experts))
        moe = (router.weight, router.bias, router.top_k, *dense)
        layers.append(LayerWeights(fuse_projections([attn.q_proj, attn.k_proj, attn.v_proj], dtype),
                                   fuse_projections([attn.o_proj], dtype), *norms, moe,
                                   expert_lora_copies(expert_lora_factors(layer.mlp.experts), dtype)))
    return EngineWeights(layers)


def expert_lora_copies(factors, dtype):
    """An expert LoRA's factors ({name: (A [E, in, r], B [E, r, out], scale)}, or None) as a decode step reads them:
    in the model's dtype, A as a view of a contiguous copy of PEFT's [E * r, in] layout (mxfp4_experts.add_lora
    multiplies it with one matmul), B contiguous with the scale folded in, as `fuse_projections` folds it (a power
    of two in the usual configurations: the same products). Copies, so that `EngineWeights.copy_from` refreshes
    them in place and each decode step skips the casts."""
    if factors is None:
        return None
    copies = {}
    for name, (a, b, scale) in factors.items():
        experts, inputs, rank = a.shape
        a_rows = a.transpose(1, 2).reshape(experts * rank, inputs).to(dtype, copy=True)
        copies[name] = (a_rows.view(experts, rank, inputs).transpose(1, 2), (b * scale).to(dtype).contiguous(), 1.0)
    return copies


def fuse_projections(modules, dtype):
    """One Projection for linear layers that read the same input: weights stacked, LoRA B block-diagonal.

    A single layer without a live adapter keeps the module's own weight and bias (no copy). LoRA: every live
    adapter of every layer contributes its A rows (stacked under the weights, with zero bias) and, in its layer's
    output rows, its B columns times its scale (zeros elsewhere, which add exactly nothing).
    """
    bases = [find_base_layer(m) for m in modules]
    biases = [b.bias if b.bias is not None else torch.zeros(b.out_features, device=b.weight.device) for b in bases]
    if len(bases) == 1:
        weight, bias = bases[0].weight.to(dtype), biases[0].to(dtype)
    else:
        weight = torch.cat([b.weight for b in bases]).to(dtype)
        bias = torch.cat([b.to(dtype) for b in biases])
    terms = [(k, a, b, scale) for k, m in enumerate(modules) for a, b, scale in lora_terms(m)]
    if not terms:
        return Projection(weight, bias)
    lora_a = torch.cat([a for _, a, _, _ in terms]).to(dtype)
    lora_b = torch.zeros(weight.shape[0], lora_a.shape[0], dtype=dtype, device=weight.device)
    weight, bias = torch.cat([weight, lora_a]), torch.cat([bias, bias.new_zeros(lora_a.shape[0])])
    starts = [0]
    for b in bases:
        starts.append(starts[-1] + b.out_features)
    col = 0
    for k, a, b, scale in terms:
        lora_b[starts[k]:starts[k + 1], col:col + a.shape[0]] = (b * scale).to(dtype)
        col += a.shape[0]
    return Projection(weight, bias, lora_b)


def lora_terms(module):
    """[(A [r, in], B [out, r], scale)] of the live LoRA adapters on a PEFT-wrapped linear layer ([] for none)."""
    if not hasattr(module, "lora_A") or module.disable_adapters or module.merged:
        return []
    terms = []
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if getattr(module, "use_dora", {}).get(name) or module.lora_B[name].bias is not None:
            raise NotImplementedError("the rollout engine runs plain LoRA adapters (no DoRA, no LoRA bias); "
                                      "use --generation-backend generate for this adapter")
        terms.append((module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name]))
    return terms


def route(h, weight, bias, top_k):
    """transformers' GptOssTopKRouter as a routing matrix [tokens, E] (mxfp4_experts.routing_matrix): each token's
    top_k experts weighted by the softmax of their logits (in h's dtype), every other expert 0. Over tensors, not
    the module, so that one compiled `finish_layer` serves every layer.

    An expert is in a token's top k when fewer than k experts are ahead of it: a larger logit, or an equal one at a
    lower index. That is what torch.topk's CUDA kernel keeps at a shared k-th place, which the training forward's
    router runs (a test in tests/test_rollout_engine_gpu.py is there to check it; a CPU's topk may keep another,
    which fp32 logits almost never meet). Elementwise work over [tokens, E, E]: compiled, two small fused kernels
    with the softmax, where torch.topk sorts in two kernels of its own.
    The logits are `linear_as_reduction`'s, summed in another order than the router's matmul: a bf16 logit may
    differ from the training forward's in its last place, which at a near-tie can pick another expert."""
    logits = linear_as_reduction(h, weight, bias)  # compiled: one small reduction, shorter than cuBLAS's call
    order = torch.arange(logits.shape[-1], device=logits.device)
    mine, other = logits[:, :, None], logits[:, None, :]
    ahead = (other > mine) | ((other == mine) & (order[None, None, :] < order[None, :, None]))
    chosen = ahead.sum(dim=-1) < top_k
    return torch.softmax(logits.masked_fill(~chosen, float("-inf")), dim=-1, dtype=logits.dtype)


def expert_tensors(experts):
    """(gate_up [E, in, 2 x inter], its bias, down [E, inter, out], its bias, limit, alpha) of a GptOssExperts."""
    return (experts.gate_up_proj, experts.gate_up_proj_bias, experts.down_proj, experts.down_proj_bias,
            experts.limit, experts.alpha)


def dense_experts(h, routing, experts, factors=None, combine_kernel=False, top_k=None):
    """Every token through every expert (one batched matmul each way), LoRA as low-rank terms, routing applied.

    At decode batch sizes every expert is touched anyway, so this reads each weight once, as the sparse path does,
    and it never materialises W + BA for 24 GiB of experts. experts: `expert_tensors`; factors: {name: (A [E, in,
    r], B [E, r, out], scale)} of an expert LoRA; routing: [tokens, E] (mxfp4_experts.routing_matrix); top_k: unused
    here (MXFP4 experts' dense_experts takes it, and both are called alike).
    """
    gate_up_proj, gate_up_bias, down_proj, down_bias, limit, alpha = experts
    factors = factors or {}
    count = gate_up_proj.shape[0]
    rows = h.to(gate_up_proj.dtype)
    x = rows.unsqueeze(0).expand(count, -1, -1)
    # matmul, then bias: the roundings of transformers' experts, and compiled the bias joins the next kernel (a
    # baddbmm would first copy it out to every token)
    gate_up = torch.bmm(x, gate_up_proj) + gate_up_bias[:, None]
    if "gate_up_proj" in factors:
        gate_up = add_lora(gate_up, rows, factors["gate_up_proj"])  # shared rows: x A as one matmul
    act = swiglu(gate_up, limit, alpha)
    out = torch.bmm(act, down_proj) + down_bias[:, None]
    if "down_proj" in factors:
        out = add_lora(out, act, factors["down_proj"])
    return combine_experts(out, routing, h.dtype, combine_kernel)


# -- the decode step's per-layer functions (compiled into fused kernels on a GPU) ---------------------------------
def attention_inputs(x, input_norm, qkv, cos, sin, kv, k_cache, v_cache, pos):
    """One decode step's q [rows * kv, groups, d] (a row's query groups laid out as its kv head's matmul rows), with
    the new k, v [rows, kv, d] written into the caches [rows, kv, keys, d] at each row's position `pos` [rows]:
    norm, fused q/k/v projection, rope, cache write. The write happens here, in place, so that compiled it is part
    of this function's kernels rather than two indexing kernels of its own."""
    rows, d = x.shape[0], cos.shape[-1]
    out = project_rows(rms_norm(x, *input_norm), *qkv)
    heads = out.shape[1] // d - 2 * kv
    qk = apply_rope(out[:, :(heads + kv) * d].view(rows, heads + kv, d), cos, sin)
    index = torch.arange(rows, device=x.device)
    k_cache[index, :, pos] = qk[:, heads:]
    v_cache[index, :, pos] = out[:, (heads + kv) * d:].view(rows, kv, d)
    return qk[:, :heads].reshape(rows * kv, heads // kv, d)


def attention_output(x, q, k_cache, v_cache, keys, sinks, scaling, o, post_norm):
    """The residual stream after the attention block, and its post-attention norm (the MoE block's input)."""
    out = attend_one(q, k_cache, v_cache, keys, sinks, scaling)
    x = x + project_rows(out.view(x.shape[0], -1), *o)
    return x, rms_norm(x, *post_norm)


def finish_layer(x, q, k_cache, v_cache, keys, sinks, scaling, o, post_norm, moe, factors=None):
    """The rest of a decode layer after attention_inputs: attention, o, norm, MoE with dense experts (and an expert
    LoRA's `factors` as low-rank terms)."""
    x, h = attention_output(x, q, k_cache, v_cache, keys, sinks, scaling, o, post_norm)
    router_weight, router_bias, top_k, experts_fn, experts = moe
    return x + experts_fn(h, route(h, router_weight, router_bias, top_k), experts, factors, keys.kernel, top_k)


class DecodeKernels:
    """The per-layer functions of a decode step, as they are or compiled by torch.compile (backend given), and
    whether the attention and the experts' combine run as Triton kernels (`triton_kernels`, see attend_one and
    mxfp4_experts.combine_experts).

    Compiled, each is one graph of fused kernels for all layers (the same shapes every layer), the cache writes
    included (in place, inside attention_inputs). If compiling or a Triton kernel fails (e.g. no C compiler
    for triton), `run_or_fall_back` says so once and the engine goes on with the plain functions, attention and
    combine: slower, the same results (within bf16 rounding for the attention and fp32 summation order).
    """

    FUNCTIONS = {"attention_inputs": attention_inputs, "attention_output": attention_output,
                 "finish_layer": finish_layer}

    def __init__(self, backend, triton_kernels=False):
        self.triton_kernels = triton_kernels
        self.use(backend)

    def use(self, backend):
        self.backend = backend
        for name, fn in self.FUNCTIONS.items():
            setattr(self, name, fn if backend is None else compiled(fn, backend))

    def run_or_fall_back(self, step):
        if self.backend is None and not self.triton_kernels:
            return step()
        try:
            return step()
        except torch.cuda.OutOfMemoryError:
            raise  # not the compiler's fault: the caller's out-of-memory message names the settings to lower
        except Exception as error:  # a compiler's failure surfaces as one of many exception types
            while (inner := getattr(error, "inner_exception", None) or error.__cause__) is not None:
                error = inner  # the compiler's own error, not dynamo's wrapper of it
            reason = next((line for line in str(error).splitlines() if line.strip()), "")[:200]
            failed = [f"torch.compile ({getattr(self.backend, '__name__', self.backend)})"] if self.backend else []
            failed += ["the Triton kernels (attention, experts' combine)"] if self.triton_kernels else []
            pronoun = "it" if self.backend and not self.triton_kernels else "them"  # the kernels are plural
            print(f"rollout engine: {' or '.join(failed)} failed, decoding without {pronoun}: "
                  f"{type(error).__name__}: {reason}", flush=True)
            self.triton_kernels = False
            self.use(None)
            return step()


COMPILED = {}  # (function, backend) -> its torch.compile wrapper, one per process: engines share compiled code


def compiled(fn, backend):
    key = (fn, backend)
    if key not in COMPILED:
        COMPILED[key] = torch.compile(fn, backend=backend, fullgraph=True,
                                      options=COMPILE_OPTIONS if backend == "inductor" else None)
    return COMPILED[key]


def find_base_layer(module):
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module
