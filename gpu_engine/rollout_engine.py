"""A sampling engine for gpt-oss: each prompt prefilled once, a static KV cache, the decode step as a CUDA graph.

Why: a GRPO step is mostly generation, and transformers' `generate` spends most of a decode step of the 20b model
launching small kernels one by one, from the host, rather than reading the weights (TRL's generate against the
engine: benchmarks/RESULTS.md). Here the whole decode step (all layers, the sampling, the bookkeeping) is one CUDA
graph replayed once per token, with no host synchronisation in between.

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

With GRPOTrainer: TRL 1.x's `rollout_func` hook (training/generation.py, Generator.rollout_func). The trainer hands it each step's prompts
(every prompt NUM_GENERATIONS times in a row) and reads back prompt ids, completion ids and log-probabilities; the
rewards, advantages and the update stay TRL's own.
"""

import math
import time

import torch

import harmony
import library_internals
from gpu_engine import sink_attention
from gpu_engine.decode_step import (DecodeKernels, Keys, additive_mask, apply_rope, attend, dense_experts, expand_mask,
                                    expert_tensors, find_base_layer, gather_weights, project, rms_norm, sample)
from gpu_engine.expert_lora import expert_lora_factors
from gpu_engine.mxfp4_experts import (dense_forward as mxfp4_dense_forward, grouped_mm_fused, is_mxfp4_experts,
                                      routing_matrix)

# -----------------------------------------------------------------------------
LENGTH_BUCKET = 128  # cache positions are rounded up to a multiple of this, so nearby prompt lengths share a graph
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)  # rows are padded up to one of these
FINISHED_CHECK_EVERY = 16  # decode steps between checks whether every row has stopped (each check syncs the GPU;
                           #   on a CPU, where a check costs nothing, every step is checked)
MAX_CACHED_GRAPHS = 2  # graphs (with their caches) kept; a third evicts the oldest
DECODE_TRITON_KERNELS = True  # on a GPU with triton, a bf16 decode step's attention is one Triton kernel that reads
                              #   only the keys in range (decode_attention_kernel.py) and the routed experts' outputs
                              #   are summed by one (combine_experts_kernel.py); False: plain torch, as on a CPU
PREFILL_PACK_TOKENS = 2048  # prompts prefilled together in one pass up to this many tokens: a pass's temporary
                            #   memory grows with it (eager attention, on a CPU, holds [heads, tokens, tokens]; bf16
                            #   experts under an expert LoRA take the dense path, [E, tokens, 2 x inter])
DENSE_EXPERTS_MAX_TOKENS = 64  # 'auto' experts: up to this many tokens every expert reads its weights anyway, and one
                               #   batched matmul over all experts beat grouped_mm (benchmarks/RESULTS.md)
# -----------------------------------------------------------------------------


class RolloutEngine:
    """Samples completions from a gpt-oss model (see module doc); one engine per model object."""

    def __init__(self, model, tokenizer, use_cuda_graphs=None, stop_ids=None, experts="auto", compile_backend="auto"):
        """experts: 'module' (the model's experts module; the dense path only for expert LoRA), 'dense' (always),
        or 'auto' (dense up to DENSE_EXPERTS_MAX_TOKENS tokens, as in a decode step, the module above).
        compile_backend: a torch.compile backend for the decode step's per-layer functions, None for none, or
        'auto': 'inductor' when CUDA graphs are used and triton is installed (fused kernels), else none.
        stop_ids: the token ids a completion ends with (default: harmony.STOP_TOKENS')."""
        if experts not in ("auto", "dense", "module"):
            raise ValueError(f"experts must be 'auto', 'dense' or 'module', not {experts!r}")
        self.model = model
        self.lm = find_causal_lm(model)
        self.core = self.lm.model
        self.config = self.lm.config
        self.device = self.lm.lm_head.weight.device
        self.use_cuda_graphs = self.device.type == "cuda" if use_cuda_graphs is None else use_cuda_graphs
        self.stop_ids = sorted(set(stop_ids or harmony.stop_token_ids(tokenizer)))
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
        per length bucket would hold the card's memory twice (training/memory_plan.py counts one)."""
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
