"""gpt-oss attention with its learned sinks through torch's fused attention (scaled_dot_product_attention).

Why: gpt-oss gives every head a learned sink, one more logit in the softmax that takes probability mass and adds
no value. transformers has no SDPA path for it (`_supports_sdpa = False`) and FlashAttention 2/3 have no backward
for it (Dao-AILab/flash-attention#1797), so training ran transformers' eager attention: a [batch, heads, queries,
keys] matrix written and read by a dozen separate kernels (scale, mask, sink column, maximum, softmax, the slice
without the sink, two matmuls, and as many again in backward). At GRPO's lengths that was the largest part of a
training step after the matmuls.

How: the sink becomes one more key of SDPA's softmax. Queries get two more dimensions holding 1, real keys 0
there, and one extra key holds sink / scaling there, split into a high and a low part in the activations' dtype
(0 elsewhere), with a value of 0: its logit is the sink (exactly for sinks in the activations' dtype, as the
loader's bf16 model has them; to ~16 bits for fp32 sinks), its value adds nothing, and the key is never masked.
Head dims are padded with zeros to a multiple of 8. SDPA runs its memory-efficient kernel (its flash kernel takes no
mask, and this call always passes one), not cuDNN's, which would build a new plan for every new shape (BACKENDS
says why); math is the fallback. The same math as eager attention,
but not the same roundings: the softmax runs in fp32 inside one fused kernel, where eager rounds scores and
probabilities to bf16 on the way (on a GPU at the 20b shape the fused result is the closer of the two to fp32:
benchmarks/RESULTS.md). The rollout engine's prefill attends through this function too; its decode step still
rounds its attention as eager does, so its log-probabilities sit a little further from this forward than from
eager's (the engine's tests hold it to the same tolerance rule).

    from gpu_engine import sink_attention
    sink_attention.register()                                   # once; model_loader does it
    AutoModelForCausalLM.from_pretrained(..., attn_implementation=sink_attention.NAME)

Rows packed with their shared prompt once (training/packed_scoring.py) come as one sequence and a
`SharedPrefixRows` keyword: `shared_prefix_attention` gathers each group's prefix and each row's segment and runs
the same function over them, so a row attends to exactly what its own forward would.

model_loader uses it on a GPU; a CPU keeps eager attention (the reference the CPU tests hold everything to in fp32).
tests/test_sink_attention.py checks outputs and gradients against transformers' eager gpt-oss attention.
"""

from dataclasses import dataclass, field

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import library_internals

NAME = "gpt_oss_sink_attention"  # the attn_implementation name registered with transformers
ALIGN = 8  # head dims of SDPA's fused kernels are multiples of this
# SDPA's backends for this attention, in torch's order of preference. Not cuDNN's: torch 2.11 tries it first on
# Hopper for a masked call, and cuDNN builds a new execution plan for every new shape (tens to hundreds of ms each,
# forward and backward), which GRPO meets at every step: each step's prompts and completions have new lengths, so
# every micro-batch and every packed prefill of the rollout engine is a shape not seen before. The math fallback
# stays last (a CPU, or a layout the fused kernels cannot take). Flash takes no mask, so with the sink's mask column
# the memory-efficient kernel is the one that runs on a GPU.
BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa_with_sinks(module, query, key, value, attention_mask, scaling, dropout=0.0, s_aux=None, **kwargs):
    """transformers' attention interface: query [batch, heads, queries, d], key / value [batch, kv heads, keys, d],
    attention_mask a boolean [batch, 1, queries, keys] (True = may attend; `sink_mask` makes it) or an additive
    float mask, s_aux the sinks [heads]. Returns ([batch, queries, heads, d], None) as eager attention does, without
    the probabilities. With the keyword `shared_prefix_rows` (a SharedPrefixRows, passed through the model's
    forward) the batch is one packed sequence and the mask is not read: `shared_prefix_attention`."""
    if s_aux is None:
        raise ValueError(f"{NAME}: no attention sinks were passed (s_aux); this implementation is for gpt-oss")
    rows = kwargs.get("shared_prefix_rows")
    if rows is not None:
        return shared_prefix_attention(module, query, key, value, rows, scaling, dropout, s_aux,
                                       kwargs.get("sliding_window"))
    batch, heads, queries, dim = query.shape
    groups = heads // key.shape[1]
    keys = key.shape[2]
    width = -(-(dim + 2) // ALIGN) * ALIGN  # room for the sink's two parts, in the fused kernels' alignment
    # the sink's logit as two parts in the activations' dtype, summed in fp32 by the kernel: exact for sinks in
    # that dtype, ~16 bits for fp32 sinks (eager attention would keep those in fp32)
    target = s_aux.float() / scaling
    high = target.to(key.dtype)
    low = (target - high.float()).to(key.dtype)
    sink_key = torch.cat([key.new_zeros(heads, dim), high[:, None], low[:, None],
                          key.new_zeros(heads, width - dim - 2)], dim=-1)
    query = torch.cat([query, query.new_ones(batch, heads, queries, 2),
                       query.new_zeros(batch, heads, queries, width - dim - 2)], dim=-1)
    # padded per kv head before the heads are repeated (query head h reads kv head h // groups, as repeat_kv)
    key = torch.cat([key, key.new_zeros(batch, key.shape[1], keys, width - dim)], dim=-1)
    value = torch.cat([value, value.new_zeros(batch, value.shape[1], keys, width - dim)], dim=-1)
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    key = torch.cat([key, sink_key[None, :, None].expand(batch, heads, 1, width)], dim=2)
    value = torch.cat([value, value.new_zeros(batch, heads, 1, width)], dim=2)
    mask = with_sink_column(attention_mask, batch, queries, keys, query, kwargs.get("sliding_window"))
    with sdpa_kernel(BACKENDS):
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                                               dropout_p=dropout)
    return out[..., :dim].transpose(1, 2).contiguous(), None


@dataclass
class SharedPrefixRows:
    """Rows that share prompts, packed into one sequence with each shared part once (training/packed_scoring.py
    builds it): for each group (the rows of one prompt, consecutive in row order) its shared prefix, then each row's
    own segment. A row's queries see its group's prefix and its own segment, causally by position; a prefix's
    queries see that prefix. Tensors index the packed sequence ([T] tokens); padding slots point at token 0 and are
    masked.

    prefix_index [G, Lp], prefix_valid [G, Lp]: each group's prefix tokens; segment_index [R, Ls], segment_valid
    [R, Ls]: each row's segment; group_rows: rows of each group (a tuple of ints, row order = group order);
    positions [T]: each token's position in its row (RoPE's, the causal and sliding-window masks')."""
    prefix_index: torch.Tensor
    prefix_valid: torch.Tensor
    segment_index: torch.Tensor
    segment_valid: torch.Tensor
    group_rows: tuple
    positions: torch.Tensor
    made: dict = field(default_factory=dict)  # window -> (prefix mask, rows' mask), made once per forward

    def __post_init__(self):
        # the slots that hold a token, flat, and that token's place: where each output goes (found once here, not
        # by a host sync in every layer)
        self.slots = tuple((valid.reshape(-1).nonzero().squeeze(1), index.reshape(-1)[valid.reshape(-1)])
                           for index, valid in ((self.prefix_index, self.prefix_valid),
                                                (self.segment_index, self.segment_valid)))

    def masks(self, window=None):
        """(prefix mask [G, 1, Lp, Lp], rows' mask [R, 1, Ls, Lp + Ls]): causal by position, within `window`
        positions for a sliding layer, padding slots never attended (a padding query attends only to the sink)."""
        if window not in self.made:
            prefix_pos, segment_pos = self.positions[self.prefix_index], self.positions[self.segment_index]
            groups = torch.arange(len(self.group_rows), device=self.positions.device)
            group_of_row = groups.repeat_interleave(torch.tensor(self.group_rows, device=groups.device))
            keys_pos = torch.cat([prefix_pos[group_of_row], segment_pos], dim=1)
            keys_valid = torch.cat([self.prefix_valid[group_of_row], self.segment_valid], dim=1)
            self.made[window] = tuple(
                visible(query_pos, key_pos, key_ok & query_ok[..., None], window)
                for query_pos, key_pos, query_ok, key_ok in ((prefix_pos, prefix_pos, self.prefix_valid,
                                                              self.prefix_valid[:, None, :]),
                                                             (segment_pos, keys_pos, self.segment_valid,
                                                              keys_valid[:, None, :])))
        return self.made[window]


def visible(query_pos, key_pos, allowed, window=None):
    """[N, 1, queries, keys] True where a query may attend a key: causal by position (within `window` positions
    when given) and `allowed` ([N, queries, keys])."""
    seen = (key_pos[:, None, :] <= query_pos[:, :, None]) & allowed
    if window:
        seen = seen & (key_pos[:, None, :] > query_pos[:, :, None] - window)
    return seen[:, None]


def shared_prefix_attention(module, query, key, value, rows, scaling, dropout, s_aux, window=None):
    """sdpa_with_sinks over one packed sequence (query [1, heads, T, d], key / value [1, kv heads, T, d]) laid out
    by `rows` (SharedPrefixRows): each group's prefix attends to itself, each row's segment to its group's prefix
    and itself, two calls of sdpa_with_sinks over gathered tokens; every token's output put back in its place.
    The same attention as each row's own forward over its prompt and completion, with the shared prefix's
    projections computed once. A prefix's keys and values reach each row of its group by `RepeatedGroups`, whose
    backward sums the rows' gradients in a fixed order; the other gathers read each token once, and their padding
    slots (all at token 0) get exactly zero gradient (masked keys, dropped outputs), which adds the same in any
    order: reproducible."""
    tokens, heads, dim = query.shape[2], query.shape[1], query.shape[3]
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, heads, d]
    prefix_mask, rows_mask = rows.masks(window)
    k_prefix, v_prefix = gathered(k, rows.prefix_index), gathered(v, rows.prefix_index)
    out_prefix, _ = sdpa_with_sinks(module, gathered(q, rows.prefix_index), k_prefix, v_prefix, prefix_mask,
                                    scaling, dropout, s_aux=s_aux)  # [G, Lp, heads, d]
    keys = torch.cat([RepeatedGroups.apply(k_prefix, rows.group_rows), gathered(k, rows.segment_index)], dim=2)
    values = torch.cat([RepeatedGroups.apply(v_prefix, rows.group_rows), gathered(v, rows.segment_index)], dim=2)
    out_rows, _ = sdpa_with_sinks(module, gathered(q, rows.segment_index), keys, values, rows_mask, scaling,
                                  dropout, s_aux=s_aux)  # [R, Ls, heads, d]
    out = q.new_zeros(tokens, heads, dim)
    for result, (slots, places) in zip((out_prefix, out_rows), rows.slots):  # padding slots' outputs are dropped
        out = out.index_copy(0, places, result.reshape(-1, heads, dim).index_select(0, slots))
    return out[None], None


def gathered(x, index):
    """x [T, heads, d] at index [N, L] -> [N, heads, L, d] (SDPA's layout)."""
    return x.index_select(0, index.reshape(-1)).view(*index.shape, *x.shape[1:]).transpose(1, 2)


class RepeatedGroups(torch.autograd.Function):
    """x [G, ...] -> each x[g] repeated group_rows[g] times (rows of a group consecutive); backward: each group's
    rows' gradients summed in a fixed order (repeat_interleave's own backward adds them with atomics on a GPU)."""

    @staticmethod
    def forward(ctx, x, group_rows):
        ctx.group_rows = group_rows
        return torch.cat([x[g:g + 1].expand(n, *x.shape[1:]) for g, n in enumerate(group_rows)])

    @staticmethod
    def backward(ctx, grad):
        sums = [part.sum(dim=0) for part in grad.split(list(ctx.group_rows))]
        return torch.stack(sums), None


def with_sink_column(mask, batch, queries, keys, query, window=None):
    """The attention mask with one more key, the sink, that every query may attend to. With no mask, a causal one
    (the queries are the last of the keys, as in a prefill or a decode step), limited to `window` keys for a
    sliding layer. A float (additive) mask comes back in the query's dtype, which SDPA requires."""
    if mask is None:
        position = torch.arange(queries, device=query.device)[:, None] + keys - queries
        key_position = torch.arange(keys, device=query.device)[None, :]
        mask = key_position <= position
        if window:
            mask = mask & (key_position > position - window)
        mask = mask.expand(batch, 1, queries, keys)
    if mask.dtype == torch.bool:
        return torch.cat([mask, mask.new_ones(*mask.shape[:-1], 1)], dim=-1)
    return torch.cat([mask, mask.new_zeros(*mask.shape[:-1], 1)], dim=-1).to(query.dtype)


def sink_mask(*args, **kwargs):
    """transformers' SDPA mask, always materialised: the sink key needs a mask column even where plain SDPA would
    pass is_causal instead."""
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def register():
    """Registers NAME with transformers' attention and mask interfaces (idempotent), after checking the
    transformers names this relies on (library_internals.ATTENTION)."""
    library_internals.check(library_internals.ATTENTION)
    AttentionInterface.register(NAME, sdpa_with_sinks)
    AttentionMaskInterface.register(NAME, sink_mask)


def attends_through_this(model):
    """Whether `model` (plain or PEFT-wrapped) runs its attention through NAME."""
    return getattr(model.config, "_attn_implementation", None) == NAME


def implementation_for(device):
    """The attn_implementation model_loader asks for: NAME on a GPU, eager on a CPU."""
    return NAME if str(device).startswith("cuda") else "eager"
