"""A sampling engine for gpt-oss: each prompt prefilled once, a static KV cache, the decode step as a CUDA graph.

Why: a GRPO step is mostly generation, and transformers' `generate` spends most of a decode step of the 20b model
on launching ~1,200 small kernels, many times what reading the weights costs (benchmarks/RESULTS.md). Here the whole decode step (all layers,
the sampling, the bookkeeping) is one CUDA graph replayed once per token, with no host synchronisation in between.

    engine = RolloutEngine(model, tokenizer)                       # model: gpt-oss, plain or PEFT-wrapped
    completions, logprobs = engine.generate(prompt_ids, max_new_tokens=256, temperature=1.0)

How it is built, in the order a token goes through it:
- the model's own modules embed, route, run the experts and project to the vocabulary; the attention block is
  the engine's own arithmetic over the model's weights, in as few kernels as it allows (each kernel launch costs
  about as much as the small matmul it runs): RMSNorm as torch's fused op, q/k/v as one matmul over the stacked
  weights plus one low-rank LoRA term, rope with transformers' roundings, the scores with mask and scale in one
  batched matmul; one static cache per layer [rows, kv heads, positions, head dim], sliding-window layers masked
  to their last 128 positions, the learned attention sinks as an extra softmax column. On a GPU (bf16, triton) a
  decode step's attention is instead one Triton kernel (decode_attention_kernel.py) that reads only each row's
  keys in range (up to its position; a sliding layer's window), softmax online, the sink as a last logit;
- the experts: in a decode step (a few dozen tokens, which touch nearly every expert) every token through every
  expert as one batched matmul each way, routing weights applied after (on a GPU, bf16, triton: one kernel that
  reads only the routed experts' rows, combine_experts_kernel.py); MXFP4 experts on a GPU multiply each expert
  only by the tokens routed to it (mxfp4_experts.routed_experts); for longer inputs (a prefill) the model's
  own experts module (grouped_mm on a GPU). With expert LoRA (PEFT `target_parameters`) bf16 experts always take
  the batched path, with the low-rank factors as two small matmuls, so the adapter is never merged into (or
  rebuilt over) the 24 GiB of expert weights; MXFP4 experts (mxfp4_experts.py) add the factors themselves, in
  their dense decode path and their grouped prefill alike (expert_lora.py);
- on a GPU with triton the decode step's per-layer functions (`attention_inputs`, `finish_layer`, ...) are
  compiled by torch.compile (inductor) into fused kernels, every intermediate rounded to its eager dtype; the
  CUDA graph then replays those (faster than the uncompiled step: benchmarks/RESULTS.md).
  Compiling takes ~13 s per batch size; where it fails the engine says so once and runs them uncompiled;
- identical prompts (a GRPO group) are prefilled once and their cache copied to every sample; a step's distinct
  prompts are prefilled together, packed into one sequence in which each attends only to itself (up to
  PREFILL_PACK_TOKENS a pass), with the training forward's attention (sink_attention.py on a GPU): every kernel,
  and the MXFP4 experts' dequantisation of each layer, runs once a pass instead of once a prompt;
- the LoRA weights stay unmerged, as low-rank terms: every `generate` first copies the adapter's current A and B
  (scale folded into B, in the model's dtype) into buffers that the graphs read at fixed addresses, so the
  optimiser's in-place updates are seen by the next rollout without capturing again (tests/test_rollout_engine.py
  checks it); a graph is captured again only when the batch or cache size bucket, the sampling mode or the set of
  enabled adapters changes (e.g. `with model.disable_adapter()` for the untrained baseline);
- sampling: temperature, top-p (nucleus), or greedy; the log-probability of each sampled token under the
  temperature-scaled distribution (what TRL's training forward computes) is returned with it;
- stops at <|return|>, <|call|>, <|endoftext|> (harmony.STOP_TOKENS); a finished row writes nothing more, and a
  completion's ids end with its stop token, as TRL's own generation returns them.
On a CPU the same code runs eagerly (no graphs): the tests check it against `model.generate` and the model's forward.

With GRPOTrainer: TRL 1.x's `rollout_func` hook (generation.training_rollout_func). The trainer hands it each step's prompts
(every prompt NUM_GENERATIONS times in a row) and reads back prompt ids, completion ids and log-probabilities; the
rewards, advantages and the update stay TRL's own.
"""

import math
import time
from typing import NamedTuple

import torch

import harmony
import library_internals
import sink_attention
from expert_lora import expert_lora_factors
from mxfp4_experts import (add_lora, combine_experts, grouped_mm_fused, routing_matrix,
                           dense_experts as mxfp4_dense_experts, dense_forward as mxfp4_dense_forward,
                           dense_tensors as mxfp4_dense_tensors, is_mxfp4_experts, swiglu)

LENGTH_BUCKET = 128  # cache positions are rounded up to a multiple of this, so nearby prompt lengths share a graph
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)  # rows are padded up to one of these
FINISHED_CHECK_EVERY = 16  # decode steps between checks whether every row has stopped (each check syncs the GPU;
                           #   on a CPU, where a check costs nothing, every step is checked)
MAX_CACHED_GRAPHS = 2  # graphs (with their caches) kept; a third evicts the oldest
COMPILE_OPTIONS = {"emulate_precision_casts": True}  # inductor: round every intermediate to its eager dtype, so a
                                                    #   fused kernel computes what the separate kernels computed
DECODE_TRITON_KERNELS = True  # on a GPU with triton, a bf16 decode step's attention is one Triton kernel that reads
                              #   only the keys in range (decode_attention_kernel.py) and the routed experts' outputs
                              #   are summed by one (combine_experts_kernel.py); False: plain torch, as on a CPU
PREFILL_PACK_TOKENS = 2048  # prompts prefilled together in one pass up to this many tokens: a pass's temporary
                            #   memory grows with it (eager attention, on a CPU, holds [heads, tokens, tokens]; bf16
                            #   experts under an expert LoRA take the dense path, [E, tokens, 2 x inter])
DENSE_EXPERTS_MAX_TOKENS = 64  # 'auto' experts: up to this many tokens every expert reads its weights anyway, and one
                               #   batched matmul over all experts beat grouped_mm (benchmarks/RESULTS.md)


class RolloutEngine:
    """Samples completions from a gpt-oss model (see module doc); one engine per model object."""

    def __init__(self, model, tokenizer, use_cuda_graphs=None, stop_tokens=harmony.STOP_TOKENS, experts="auto",
                 compile_backend="auto"):
        """experts: 'module' (the model's experts module; the dense path only for expert LoRA), 'dense' (always),
        or 'auto' (dense up to DENSE_EXPERTS_MAX_TOKENS tokens, as in a decode step, the module above).
        compile_backend: a torch.compile backend for the decode step's per-layer functions, None for none, or
        'auto': 'inductor' when CUDA graphs are used and triton is installed (fused kernels), else none."""
        if experts not in ("auto", "dense", "module"):
            raise ValueError(f"experts must be 'auto', 'dense' or 'module', not {experts!r}")
        self.model = model
        self.lm = find_causal_lm(model)
        self.core = self.lm.model
        self.config = self.lm.config
        self.device = self.lm.lm_head.weight.device
        self.use_cuda_graphs = self.device.type == "cuda" if use_cuda_graphs is None else use_cuda_graphs
        self.stop_ids = sorted({tokenizer.convert_tokens_to_ids(t) for t in stop_tokens})
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.dtype = self.core.embed_tokens.weight.dtype
        self.head_dim = self.config.head_dim
        self.kv_heads = self.config.num_key_value_heads
        self.groups = self.config.num_attention_heads // self.kv_heads
        self.window = self.config.sliding_window
        self.sliding = [t == "sliding_attention" for t in self.config.layer_types]
        library_internals.check(library_internals.ENGINE)
        # transformers' grouped_mm experts are graph-safe (bf16, where torch's grouped_mm is one fused kernel); its
        # eager loop, its fp32 fallback and torch's grouped_mm below Hopper sync the host
        graph_safe = (getattr(self.config, "_experts_implementation", None) == "grouped_mm"
                      and self.lm.model.layers[0].mlp.router.weight.dtype == torch.bfloat16
                      and self.device.type == "cuda" and grouped_mm_fused(self.device))
        self.experts = "dense" if self.use_cuda_graphs and not graph_safe else experts
        if compile_backend == "auto":
            compile_backend = "inductor" if self.use_cuda_graphs and has_triton() else None
        triton_kernels = (DECODE_TRITON_KERNELS and self.device.type == "cuda" and self.dtype == torch.bfloat16
                          and has_triton())
        self.kernels = DecodeKernels(compile_backend, triton_kernels)
        # the prefill attends as the training forward does: sink_attention where model_loader chose it (a GPU)
        self.prefill_attention = getattr(self.config, "_attn_implementation", None)
        self.graphs = {}  # key -> DecodeState (with its graph)
        self.weight_sets = {}  # adapter signature -> EngineWeights (the buffers the graphs of that signature read)
        self.weights = None
        self.rope_cache = None

    # -- public -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt_ids, max_new_tokens, temperature=1.0, top_p=1.0, greedy=False):
        """Sample one completion per entry of `prompt_ids` (a list of token-id lists; repeats are prefilled once).

        Returns (completions, logprobs): per entry, the generated ids (ending with the stop token when one was
        sampled) and the log-probability of each under softmax(logits / temperature).
        """
        if not prompt_ids:
            return [], []
        empty = [k for k, ids in enumerate(prompt_ids) if len(ids) == 0]
        if empty:
            raise ValueError(f"prompt {empty[0]} of {len(prompt_ids)} has no tokens: an empty prompt was passed; every "
                             "prompt needs at least one (the first completion token is sampled after its last one)")
        if not greedy and not temperature > 0:
            raise ValueError(f"temperature must be > 0 for sampling (got {temperature}); use greedy=True instead")
        groups = {}
        for row, ids in enumerate(prompt_ids):
            groups.setdefault(tuple(ids), []).append(row)
        rows = len(prompt_ids)
        length = max(len(ids) for ids in prompt_ids) + max_new_tokens
        key = (bucket(rows, BATCH_BUCKETS), math.ceil(length / LENGTH_BUCKET) * LENGTH_BUCKET, max_new_tokens,
               "greedy" if greedy else ("top_p" if top_p < 1 else "sample"), adapter_signature(self.model))
        with torch.autocast(self.device.type, enabled=False):
            self.weights = self._refresh_weights(key[-1])
            state = self._state_for(key)
            state.reset(temperature, top_p)
            for pack in packs_of(list(groups.items()), PREFILL_PACK_TOKENS):
                self._prefill(state, pack)
            state.step.fill_(1)
            check_every = FINISHED_CHECK_EVERY if self.device.type == "cuda" else 1
            for t in range(1, max_new_tokens):
                if t % check_every == 0 and bool(state.finished[:rows].all()):
                    break
                state.run()
            tokens = state.out_tokens[:rows].tolist()
            logprobs = state.out_logprobs[:rows].tolist()
        return cut_at_stop(tokens, logprobs, self.stop_ids)

    def release(self):
        """Drop the captured graphs, their caches and the weight copies (all rebuilt on the next `generate`), and give
        the freed memory back to the card."""
        self.graphs.clear()
        self.weight_sets.clear()
        self.weights = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # a graph's pool is freed once its last replay is done
            torch.cuda.empty_cache()

    def _refresh_weights(self, signature):
        """The layers' weights as the decode step reads them, copied in place from the live model.

        Fused q/k/v projections and the LoRA factors (scale folded in) in the model's dtype, the norms' weights in
        fp32. The copies stay at the same addresses, so captured graphs read the values of this call: an
        optimiser step between two rollouts is seen by the next one, with no capture again.
        """
        fresh = gather_weights(self.core, self.dtype)
        kept = self.weight_sets.get(signature)
        if kept is None:
            self.weight_sets[signature] = fresh
            return fresh
        kept.copy_from(fresh)
        return kept

    def cache_bytes(self):
        """GPU bytes held by the kept caches and output buffers (not counting the graphs' own pools)."""
        return sum(s.nbytes() for s in self.graphs.values())

    # -- state and graphs ---------------------------------------------------------------------------------------
    def _state_for(self, key):
        if self.kernels.triton_kernels:
            key = self._longest_fitting(key)
        if key in self.graphs:
            self.graphs[key] = self.graphs.pop(key)  # most recently used last
            return self.graphs[key]
        if self.kernels.triton_kernels:  # a longer cache of the same kind replaces the shorter ones
            for kept in [k for k in self.graphs if k[:1] + k[2:] == key[:1] + key[2:]]:
                del self.graphs[kept]
        while len(self.graphs) >= MAX_CACHED_GRAPHS:
            self.graphs.pop(next(iter(self.graphs)))
        rows, length, max_new, mode, _ = key
        self._ensure_rope(length)
        state = DecodeState(self, rows, length, max_new, mode)
        if self.use_cuda_graphs:
            start = time.perf_counter()
            state.capture()
            state.capture_seconds = time.perf_counter() - start
        self.graphs[key] = state
        return state

    def _longest_fitting(self, key):
        """The key of a kept state like `key` (rows, new tokens, sampling, adapters) whose cache is at least as long,
        or `key` itself. With the attention kernel, which reads only each row's keys in range, a longer cache costs
        nothing but its memory: one cache of the longest length a run has met serves every shorter step, where one
        per length bucket would hold the card's memory twice (memory_plan.py counts one)."""
        longer = [k for k in self.graphs if k[:1] + k[2:] == key[:1] + key[2:] and k[1] >= key[1]]
        return min(longer, key=lambda k: k[1]) if longer else key

    def _ensure_rope(self, length):
        """cos/sin tables for positions 0..length-1 from the model's own rotary embedding (yarn scaling included),
        widened to the whole head for `apply_rope`: [cos, cos] and [-sin, sin]."""
        if self.rope_cache is not None and self.rope_cache[0].shape[0] >= length:
            return
        positions = torch.arange(length, device=self.device)[None]
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        cos, sin = self.core.rotary_emb(probe, positions)
        self.rope_cache = (torch.cat([cos[0], cos[0]], dim=-1), torch.cat([-sin[0], sin[0]], dim=-1))

    # -- the model, layer by layer ------------------------------------------------------------------------------
    def _prefill(self, state, prompts):
        """Run prompts [(ids, member rows)] through the model packed into one sequence (each prompt attends only to
        itself, its positions counted from 0), copy each prompt's cache to its rows, sample their first tokens.

        One pass for all of a step's prompts: the MXFP4 experts' prefill path dequantises a layer's experts once per
        pass, and every kernel runs once. The attention is the training forward's: sink_attention on a GPU (where
        model_loader chose it), else eager attention's arithmetic (`attend`)."""
        lengths = [len(ids) for ids, _ in prompts]
        total = sum(lengths)
        starts = [sum(lengths[:k]) for k in range(len(prompts))]
        heads, kv, d = self.kv_heads * self.groups, self.kv_heads, self.head_dim
        device = self.device
        ids = torch.tensor([t for prompt, _ in prompts for t in prompt], device=device)
        x = self.core.embed_tokens(ids)  # [total, hidden]
        positions = torch.cat([torch.arange(n, device=device) for n in lengths])
        cos, sin = self.rope_cache[0][positions][:, None], self.rope_cache[1][positions][:, None]  # [total, 1, d]
        prompt_lengths = torch.tensor(lengths, device=device)
        segment = torch.repeat_interleave(torch.arange(len(prompts), device=device), prompt_lengths)
        place = torch.arange(total, device=device)
        causal = (segment[:, None] == segment[None, :]) & (place[None, :] <= place[:, None])
        allowed = {False: causal, True: causal & (place[None, :] > place[:, None] - self.window)}
        fused = self.prefill_attention == sink_attention.NAME
        masks = {kind: m[None, None] if fused else additive_mask(m, self.dtype) for kind, m in allowed.items()}
        members = [torch.tensor(rows, device=device) for _, rows in prompts]
        for i, (layer, w) in enumerate(zip(self.core.layers, self.weights.layers)):
            qkv = project(rms_norm(x, *w.input_norm), *w.qkv)
            qk = apply_rope(qkv[:, :(heads + kv) * d].view(total, heads + kv, d), cos, sin)
            k = qk[:, heads:].transpose(0, 1)  # [kv, total, d]
            v = qkv[:, (heads + kv) * d:].view(total, kv, d).transpose(0, 1)
            for rows, start, n in zip(members, starts, lengths):
                state.k[i][rows, :, :n] = k[None, :, start:start + n]
                state.v[i][rows, :, :n] = v[None, :, start:start + n]
            attn = layer.self_attn
            if fused:
                q = qk[:, :heads].transpose(0, 1)[None]  # [1, heads, total, d]
                out, _ = sink_attention.sdpa_with_sinks(attn, q, k[None], v[None], masks[self.sliding[i]],
                                                        attn.scaling, s_aux=attn.sinks)
                out = out[0].reshape(total, heads * d)
            else:
                q = qk[:, :heads].transpose(0, 1).reshape(kv, self.groups, total, d)
                out = attend(q, k.unsqueeze(1), v.unsqueeze(1), masks[self.sliding[i]],
                             attn.sinks.view(kv, self.groups, 1), attn.scaling)
                out = out.permute(2, 0, 1, 3).reshape(total, heads * d)
            x = x + project(out, *w.o)
            x = x + self._mlp(layer.mlp, rms_norm(x, *w.post_norm), expert_lora_factors(layer.mlp.experts))
        ends = torch.tensor([start + n - 1 for start, n in zip(starts, lengths)], device=device)
        logits = self.lm.lm_head(self.core.norm(x[ends])).float()  # [prompts, vocab]
        rows = torch.cat(members)
        source = torch.repeat_interleave(torch.arange(len(prompts), device=device),
                                         torch.tensor([len(r) for r in members], device=device))
        token, logprob = sample(logits[source], state.temperature[rows], state.top_p[rows], state.mode)
        state.tokens[rows] = token
        state.pos[rows] = prompt_lengths[source]
        state.out_tokens[rows, 0] = token
        state.out_logprobs[rows, 0] = logprob
        state.finished[rows] = torch.isin(token, state.stop_ids)

    def _decode(self, state):
        """One decode step for every row: the body of the CUDA graph (see DecodeState.run)."""
        rows, kv = state.rows, self.kv_heads
        pos = state.pos
        x = self.core.embed_tokens(state.tokens)  # [rows, hidden]
        cos, sin = self.rope_cache[0][pos][:, None], self.rope_cache[1][pos][:, None]  # [rows, 1, head_dim]
        k_pos = torch.arange(state.length, device=self.device)[None]
        causal = k_pos <= pos[:, None]
        # masks [rows * kv heads, 1, keys]: the layout of the attention's batched matmul, made once for all layers;
        # the attention kernel reads the positions instead and needs none
        kernel = self.kernels.triton_kernels

        def mask(allowed):
            return None if kernel else expand_mask(additive_mask(allowed, self.dtype), kv)

        keys = {False: Keys(mask(causal), pos, state.length, kernel),
                True: Keys(mask(causal & (k_pos > pos[:, None] - self.window)), pos, self.window, kernel)}
        for i, (layer, w) in enumerate(zip(self.core.layers, self.weights.layers)):
            q = self.kernels.attention_inputs(x, w.input_norm, w.qkv, cos, sin, kv, state.k[i], state.v[i], pos)
            attention = (x, q, state.k[i], state.v[i], keys[self.sliding[i]], state.sinks[i],
                         layer.self_attn.scaling, w.o, w.post_norm)
            factors = w.expert_lora  # the refreshed copies: no per-step casts in the captured graph
            if self._dense_experts(rows):
                # the whole rest of the layer as one function: attention, o, norm, router, experts (and their LoRA)
                x = self.kernels.finish_layer(*attention, w.moe, factors)
            else:
                x, h = self.kernels.attention_output(*attention)
                x = x + self._mlp(layer.mlp, h, factors, decode=True)
        logits = self.lm.lm_head(self.core.norm(x)).float()
        token, logprob = sample(logits, state.temperature, state.top_p, state.mode)
        token = torch.where(state.finished, torch.full_like(token, self.pad_id), token)
        logprob = torch.where(state.finished, torch.zeros_like(logprob), logprob)
        state.out_tokens.index_copy_(1, state.step, token[:, None])
        state.out_logprobs.index_copy_(1, state.step, logprob[:, None])
        state.finished |= torch.isin(token, state.stop_ids)
        state.tokens.copy_(token)
        state.pos.add_(1)
        state.step.add_(1)

    def _mlp(self, mlp, h, factors, decode=False):
        """The MoE block: the router, then the experts module or the dense path (always with a bf16 expert LoRA:
        `factors`); MXFP4 experts take their own dense kernels in any decode step (those are what a CUDA graph can
        hold) and their module, which adds an expert LoRA's terms itself, in a prefill."""
        shape = h.shape
        h = h.reshape(-1, shape[-1])
        _, scores, index = mlp.router(h)
        experts = find_base_layer(mlp.experts)
        mxfp4 = is_mxfp4_experts(experts)
        if mxfp4 and (decode or self._dense_experts(h.shape[0])):
            out = mxfp4_dense_forward(experts, h, index, scores, factors)
        elif mxfp4 or (factors is None and not self._dense_experts(h.shape[0])):
            out = mlp.experts(h, index, scores)
        else:
            routing = routing_matrix(index, scores, experts.num_experts)
            out = dense_experts(h, routing, expert_tensors(experts), factors)
        return out.reshape(shape)

    def _dense_experts(self, tokens):
        return self.experts == "dense" or (self.experts == "auto" and tokens <= DENSE_EXPERTS_MAX_TOKENS)


class DecodeState:
    """Static buffers of one (rows, cache length, sampling mode) bucket, and the CUDA graph of its decode step."""

    def __init__(self, engine, rows, length, max_new, mode):
        self.engine, self.rows, self.length, self.mode = engine, rows, length, mode
        device, cfg = engine.device, engine.config
        shape = (rows, engine.kv_heads, length, engine.head_dim)
        self.k = [torch.zeros(shape, dtype=engine.dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=engine.dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.pos = torch.zeros(rows, dtype=torch.long, device=device)
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.finished = torch.ones(rows, dtype=torch.bool, device=device)
        self.temperature = torch.ones(rows, 1, device=device)
        self.top_p = torch.ones(rows, 1, device=device)
        self.out_tokens = torch.zeros(rows, max_new, dtype=torch.long, device=device)
        self.out_logprobs = torch.zeros(rows, max_new, device=device)
        self.stop_ids = torch.tensor(engine.stop_ids, device=device)
        # each layer's attention sinks laid out as the decode step's [rows * kv heads, groups, 1] logits column
        self.sinks = [torch.zeros(rows * engine.kv_heads, engine.groups, 1, dtype=engine.dtype, device=device)
                      for _ in range(cfg.num_hidden_layers)]
        self.graph = None
        self.capture_seconds = 0.0

    def reset(self, temperature, top_p):
        """Fresh outputs; rows that no prompt fills (batch padding) start finished and only write padding."""
        self.finished.fill_(True)
        self.pos.zero_()
        self.tokens.fill_(self.engine.pad_id)
        self.out_tokens.fill_(self.engine.pad_id)
        self.out_logprobs.zero_()
        self.temperature.fill_(temperature if temperature > 0 else 1.0)
        self.top_p.fill_(top_p)
        kv, groups = self.engine.kv_heads, self.engine.groups
        for sinks, layer in zip(self.sinks, self.engine.core.layers):
            sinks.view(self.rows, kv, groups).copy_(layer.self_attn.sinks.view(1, kv, groups))

    def capture(self):
        """Record one decode step as a CUDA graph (after warm-up runs on a side stream, as CUDA graphs require)."""
        self.reset(1.0, 1.0)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.step.zero_()
                self.engine.kernels.run_or_fall_back(lambda: self.engine._decode(self))
        torch.cuda.current_stream().wait_stream(stream)
        self.step.zero_()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.engine._decode(self)

    def run(self):
        if self.graph is not None:
            self.graph.replay()
        else:
            self.engine.kernels.run_or_fall_back(lambda: self.engine._decode(self))

    def nbytes(self):
        tensors = self.k + self.v + [self.out_tokens, self.out_logprobs]
        return sum(t.numel() * t.element_size() for t in tensors)


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
    that the plain path adds to its scores (None when the kernel runs), and what the kernel reads instead: each row's position [rows] (the one
    just written) and the layer's window (the cache length for a full-attention layer). kernel: whether the
    Triton kernels run (`DecodeKernels.triton_kernels`): this attention kernel, and the experts' combine kernel."""
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
    batch, groups, d = q.shape
    _, kv, length, _ = k_cache.shape
    if not (q.dtype == k_cache.dtype == v_cache.dtype == torch.bfloat16) or d < 16 or d & (d - 1):
        raise ValueError(f"decode_attention: the kernel takes bf16 queries and caches and a power-of-two head size "
                         f"of at least 16, got {q.dtype} / {k_cache.dtype} and {d}; use the plain path "
                         "(rollout_engine.DECODE_TRITON_KERNELS = False)")
    import decode_attention_kernel  # triton: a GPU extra, checked by has_triton() before this kernel is chosen
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


def has_triton():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def supports(model):
    """True for a gpt-oss whose experts the engine can run: GptOssExperts, plain or LoRA-wrapped, or Mxfp4Experts
    (not transformers' own MXFP4 kernels' replacement modules, which take their routing inside)."""
    try:
        lm = find_causal_lm(model)
    except TypeError:
        return False
    return all(hasattr(layer.mlp, "router") and (hasattr(find_base_layer(layer.mlp.experts), "gate_up_proj") or
                                                 is_mxfp4_experts(find_base_layer(layer.mlp.experts)))
               for layer in lm.model.layers)


def find_base_layer(module):
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def find_causal_lm(model):
    """The GptOssForCausalLM inside a plain or PEFT-wrapped model."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if not (hasattr(model, "lm_head") and hasattr(model, "model") and hasattr(model.model, "layers")):
        raise TypeError(f"{type(model).__name__} is not a gpt-oss causal LM")
    return model


def adapter_signature(model):
    """Which LoRA adapters are live, so that a graph captured with them is not replayed without them."""
    signature = []
    for module in model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "disable_adapters"):
            signature.append((module.disable_adapters, module.merged, tuple(module.active_adapters)))
    return hash(tuple(signature))


def packs_of(prompts, budget):
    """Consecutive prompts [(ids, rows)] grouped into packs of at most `budget` tokens (a longer prompt alone)."""
    packs, size = [], 0
    for prompt in prompts:
        if packs and size + len(prompt[0]) <= budget:
            packs[-1].append(prompt)
            size += len(prompt[0])
        else:
            packs.append([prompt])
            size = len(prompt[0])
    return packs


def bucket(n, sizes):
    """The smallest size >= n (n itself beyond the largest)."""
    return next((s for s in sizes if s >= n), n)


def cut_at_stop(tokens, logprobs, stop_ids):
    """Per row: ids up to and including the first stop token (all of them when none was sampled)."""
    stops = set(stop_ids)
    completions, completion_logprobs = [], []
    for ids, lps in zip(tokens, logprobs):
        end = next((k + 1 for k, t in enumerate(ids) if t in stops), len(ids))
        completions.append(ids[:end])
        completion_logprobs.append(lps[:end])
    return completions, completion_logprobs


def engine_of(model):
    """The engine engine_for made for `model`, or None."""
    return getattr(model, "_rollout_engine", None)


def engine_for(model, tokenizer):
    """The model's engine, made on first use and kept on the model object (graphs survive between calls)."""
    engine = engine_of(model)
    if engine is None:
        engine = RolloutEngine(model, tokenizer)
        object.__setattr__(model, "_rollout_engine", engine)
    return engine
