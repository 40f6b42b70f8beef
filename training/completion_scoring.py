"""Log-probabilities of sampled completions on a CPU, for GRPO's loss and KL reference: each prompt's forward once.

    score_completions(model, input_ids, attention_mask, logits_to_keep, ...)   # grpo_trainer.TesGRPOTrainer on a CPU

TRL 1.x computes every log-probability through its chunked LM head, which never materialises the logits (at
gpt-oss's 201k vocabulary they would not fit on a GPU). That path is kept on every other device. On a CPU it is
the wrong trade: without Triton it scores every position of prompt and completion and folds each vocabulary tile
in a dozen separate ops, and a GRPO batch runs the same prompt through the model once per generation. On the tiny
stand-in (928 tokens, prompts twice as long as the completions) the two made up half of a training step.

Here, within each batch TRL hands over:
- the distinct prompts (rows of prompt ids and mask; a GRPO group shares one) go through the model once, with a
  KV cache, and the cache is indexed out to every row (TRL shuffles rows, so groups need not be contiguous), by
  `index_select`, whose backward adds a group's gradients in a fixed order: a run is reproducible;
- the completions then run over that cache; gradients flow back through it into the prompts' forward, so the loss
  and its gradient are those of one forward over the whole sequence, to rounding (tests/test_grpo_trainer.py);
- the LM head projects only the positions that predict a completion token, and TRL's own
  `selective_log_softmax_and_entropy` turns the logits into log-probabilities and entropies;
- the MoE load-balancing loss (TRL adds it for gpt-oss, coefficient 0.001) is transformers' own function over the
  router logits of every row and position, the shared prompt's counted once per row as in a plain forward.
Gradient checkpointing turns caching off inside the layers, so with it the rows run as one plain forward instead.
"""

import contextlib
import inspect

import torch
from transformers import DynamicCache
from transformers.models.gpt_oss.modeling_gpt_oss import load_balancing_loss_func
from trl.trainer.utils import selective_log_softmax_and_entropy

from gpu_engine.rollout_engine import find_causal_lm


def split_prompts(input_ids, attention_mask, completion_len):
    """Distinct prompt rows and, for every row, the index of its prompt: (prompt ids, prompt mask, index)."""
    width = input_ids.size(1) - completion_len
    rows = torch.cat([input_ids[:, :width], attention_mask[:, :width].to(input_ids.dtype)], 1)
    distinct, index = torch.unique(rows, dim=0, return_inverse=True)
    return distinct[:, :width], distinct[:, width:].to(attention_mask.dtype), index


def take_rows(x, index):
    """x[index] along the first dimension, with a reproducible backward.

    `x[index]` backpropagates through `index_put_(accumulate=True)`, which on a CPU adds the rows of a group in
    whatever order the threads reach them, so two runs of the same seed part after a few steps; `index_select`'s
    backward (`index_add_`) adds them in a fixed order.
    """
    return x.index_select(0, index)


def completion_logits(model, input_ids, attention_mask, completion_len, router_logits=False):
    """Logits of the positions that predict the last `completion_len` tokens, [rows, completion_len, vocab], and the
    router logits of every layer as a plain forward returns them ([rows x positions, experts] each) or None.

    `model` is a gpt-oss causal LM, plain or PEFT-wrapped (with its adapter enabled or not, as the caller set it).
    """
    lm = find_causal_lm(model)
    backbone, head = lm.model, lm.lm_head
    rows = input_ids.size(0)
    prompt_ids, prompt_mask, index = split_prompts(input_ids, attention_mask, completion_len)
    checkpointing = any(getattr(layer, "gradient_checkpointing", False) for layer in backbone.layers)
    if len(prompt_ids) == rows or checkpointing:  # nothing shared, or no cache: one forward over every token
        out = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                       output_router_logits=router_logits)
        gates = out.router_logits if router_logits else None
        return head(out.last_hidden_state[:, -completion_len - 1:-1]), gates

    cache = DynamicCache(config=lm.config)
    # transformers renamed `past_key_values` to `cache` (5.2x); the GPU image's 5.17 has only the old name
    cache_arg = {"cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values": cache}
    prompts = backbone(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=True,
                       output_router_logits=router_logits, **cache_arg)
    for layer in cache.layers:  # every row gets its prompt's keys and values
        layer.keys, layer.values = take_rows(layer.keys, index), take_rows(layer.values, index)
    completions = backbone(input_ids=input_ids[:, -completion_len:], attention_mask=attention_mask, use_cache=True,
                           output_router_logits=router_logits, **cache_arg)
    hidden = torch.cat([take_rows(prompts.last_hidden_state[:, -1:], index), completions.last_hidden_state[:, :-1]], 1)
    gates = None
    if router_logits:
        width, experts = prompt_ids.size(1), prompts.router_logits[0].size(-1)
        gates = tuple(torch.cat([take_rows(p.view(-1, width, experts), index),
                                 c.view(rows, completion_len, experts)], 1).view(-1, experts)
                      for p, c in zip(prompts.router_logits, completions.router_logits))
    return head(hidden), gates


def score_completions(model, input_ids, attention_mask, logits_to_keep, batch_size, temperature,
                      compute_entropy=False, compute_aux_loss=False, autocast=contextlib.nullcontext):
    """What TRL's `_get_per_token_logps_and_entropies` returns, computed by `completion_logits` in chunks of
    `batch_size` rows: (log-probabilities [rows, logits_to_keep], entropies or None, MoE aux loss or None); padding
    scores 0, as in TRL's own path. `autocast`: the trainer's mixed-precision context."""
    config = model.config
    logps, entropies, aux_losses = [], [], []
    for start in range(0, input_ids.size(0), batch_size):
        ids, mask = input_ids[start:start + batch_size], attention_mask[start:start + batch_size]
        with autocast():
            logits, gates = completion_logits(model, ids, mask, logits_to_keep, router_logits=compute_aux_loss)
        targets, kept = ids[:, -logits_to_keep:], mask[:, -logits_to_keep:].bool()
        logp, entropy = selective_log_softmax_and_entropy(logits.float(), targets, temperature=temperature)
        logps.append(logp.masked_fill(~kept, 0.0))
        entropies.append(entropy.masked_fill(~kept, 0.0))
        if compute_aux_loss:
            aux_losses.append(load_balancing_loss_func(gates, config.num_local_experts, config.num_experts_per_tok,
                                                       mask))
    return (torch.cat(logps), torch.cat(entropies) if compute_entropy else None,
            torch.stack(aux_losses).mean() if compute_aux_loss else None)
