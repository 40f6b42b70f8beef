"""Log-probabilities of GRPO rows with each shared prompt run once: a micro-batch's rows packed into one sequence.

    score_rows(model, input_ids, attention_mask, logits_to_keep, batch_size, ...)   # grpo_trainer.TesGRPOTrainer

Why: a GRPO micro-batch holds several completions of each prompt (a micro-batch of 16 rows of workload W holds all
4 of its prompts, ~4 rows each: TRL shuffles the rows), and TRL's forward runs each row's prompt again, padded to
the longest: 16 x (~270 + 256) tokens, ~38 % of them a repeated prompt or padding. Every token costs the experts,
the attention projections and the router, three times over with gradient checkpointing (forward, recompute,
backward).

How: `pack_rows` lays the rows out as one sequence without padding: for each distinct prompt, all its tokens but
the last once (the group's shared prefix), then for each of its rows that last token and the row's completion (the
row's segment: the last prompt token predicts each row's first completion token, so it cannot be shared).
sink_attention.shared_prefix_attention lets a segment attend to its prefix and to itself, a prefix to itself;
positions restart in each row as in its own forward (RoPE sees the same distances). The model runs through TRL's
fused LM head with `shift_labels` (each packed position's target, -100 where none), so the logits are never
materialised, exactly as on TRL's own path; the MoE load-balancing loss gets each token weighted by the rows that
share it (the model's 2-D attention mask, which the loss reads), so it equals the plain forward's. The results come
back in the rows' order: the same log-probabilities, entropies and losses as TRL's path, to rounding
(tests/test_packed_scoring.py).

Used where SHARED_PROMPTS (or the variable SHARED_PROMPTS_VARIABLE) says so and the model attends through
sink_attention.NAME (model_loader's choice on a GPU); rows whose masks have holes are scored by TRL's path
(`why_not` says which; the trainer says it once).
"""

import contextlib
import os
from dataclasses import dataclass

import torch

from gpu_engine import sink_attention

# -----------------------------------------------------------------------------
SHARED_PROMPTS = False  # score a micro-batch's rows packed, each shared prompt once (the default stays TRL's
                        #   forward per row until the GPU's numbers are in benchmarks/RESULTS.md)
SHARED_PROMPTS_VARIABLE = "GPT_OSS_SHARED_PROMPTS"  # '1' or '0': SHARED_PROMPTS for one process (benchmark rows)
# -----------------------------------------------------------------------------


@dataclass
class PackedRows:
    """A micro-batch packed by `pack_rows`: the model's inputs ([1, T] each), the attention's layout, and where each
    row's completion tokens are predicted (score_index [rows, completion_len] into the T positions, score_valid)."""
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    shift_labels: torch.Tensor
    token_weights: torch.Tensor
    layout: sink_attention.SharedPrefixRows
    score_index: torch.Tensor
    score_valid: torch.Tensor


def shared_prompts_enabled():
    """SHARED_PROMPTS, or the choice named in the variable SHARED_PROMPTS_VARIABLE ('1' or '0')."""
    value = os.environ.get(SHARED_PROMPTS_VARIABLE, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{SHARED_PROMPTS_VARIABLE}={value!r}: '1' scores rows with each shared prompt once, '0' "
                         "row by row; unset it for the default")
    return SHARED_PROMPTS if value == "" else value == "1"


def why_not(model, attention_mask, completion_len):
    """None where score_rows scores these rows (enabled, the model attending through sink_attention.NAME, every
    row's mask one run of prompt tokens ending at the completion and one run of completion tokens starting there),
    else why not, in a few words."""
    if not shared_prompts_enabled():
        return f"{SHARED_PROMPTS_VARIABLE} is off"
    if not sink_attention.attends_through_this(model):
        return f"the model does not attend through {sink_attention.NAME} (a GPU's attention)"
    if not contiguous_rows(attention_mask.bool(), attention_mask.size(1) - completion_len).all():
        return "a row's attention mask has a hole"
    return None


def contiguous_rows(mask, width):
    """[rows] True where the prompt part (mask[:, :width]) is left padding then tokens and the completion part is
    tokens then right padding."""
    prompt, completion = mask[:, :width].int(), mask[:, width:].int()
    # a 0 after a 1 in the prompt, or a 1 after a 0 in the completion, is a hole
    prompt_ok = (prompt[:, 1:] >= prompt[:, :-1]).all(dim=1) if width > 1 else torch.ones_like(mask[:, 0])
    completion_ok = ((completion[:, 1:] <= completion[:, :-1]).all(dim=1) if completion.size(1) > 1
                     else torch.ones_like(mask[:, 0]))
    return prompt_ok & completion_ok & mask[:, :width].any(dim=1)


def pack_rows(input_ids, attention_mask, completion_len):
    """PackedRows of rows [rows, width + completion_len] (left-padded prompts, right-padded completions; masks
    without holes: `contiguous_rows`). Groups in the order their prompts first appear, rows of a group in row order.
    Built on the host from the masks (one copy from the GPU per micro-batch)."""
    ids, mask = input_ids.cpu(), attention_mask.cpu().bool()
    rows, width = ids.size(0), ids.size(1) - completion_len
    groups = {}  # a prompt's tokens -> its rows
    for r in range(rows):
        groups.setdefault(tuple(ids[r, :width][mask[r, :width]].tolist()), []).append(r)
    tokens, positions, labels, weights, prefixes, segments = [], [], [], [], [], []
    score_index = torch.zeros(rows, completion_len, dtype=torch.long)
    score_valid = torch.zeros(rows, completion_len, dtype=torch.bool)
    for prompt, members in groups.items():
        shared = len(prompt) - 1
        prefixes.append(range(len(tokens), len(tokens) + shared))
        tokens += prompt[:-1]
        positions += range(shared)
        labels += [-100] * shared
        weights += [len(members)] * shared  # each row's forward would have run these tokens
        for r in members:
            completion = ids[r, width:][mask[r, width:]].tolist()
            start, n = len(tokens), len(completion)
            segments.append(range(start, start + n + 1))
            tokens += [prompt[-1]] + completion
            positions += range(shared, shared + n + 1)
            labels += completion + [-100]  # the last prompt token predicts the first completion token
            weights += [1] * (n + 1)
            score_index[r, :n] = torch.arange(start, start + n)
            score_valid[r, :n] = True
    device = input_ids.device
    prefix_index, prefix_valid = padded(prefixes)
    segment_index, segment_valid = padded(segments)
    layout = sink_attention.SharedPrefixRows(
        prefix_index.to(device), prefix_valid.to(device), segment_index.to(device), segment_valid.to(device),
        tuple(len(members) for members in groups.values()), torch.tensor(positions, device=device))
    as_row = dict(device=device)
    return PackedRows(torch.tensor([tokens], **as_row), torch.tensor([positions], **as_row),
                      torch.tensor([labels], **as_row), torch.tensor([weights], dtype=torch.float32, **as_row),
                      layout, score_index.to(device), score_valid.to(device))


def padded(ranges):
    """Ranges of token indices -> (index [N, longest, at least 1], valid [N, longest]), padding slots at token 0."""
    longest = max(1, max(len(r) for r in ranges))
    index = torch.zeros(len(ranges), longest, dtype=torch.long)
    valid = torch.zeros(len(ranges), longest, dtype=torch.bool)
    for i, r in enumerate(ranges):
        index[i, :len(r)] = torch.tensor(list(r), dtype=torch.long)
        valid[i, :len(r)] = True
    return index, valid


def score_rows(model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy=False,
               compute_aux_loss=False, autocast=contextlib.nullcontext):
    """What TRL's `_get_per_token_logps_and_entropies` returns, each chunk of `batch_size` rows packed
    (`pack_rows`) and run once through the model's TRL fused LM head: (log-probabilities [rows, logits_to_keep],
    entropies or None, MoE aux loss or None); positions past a completion score 0, as on TRL's path. `model`: a
    gpt-oss causal LM (plain or PEFT-wrapped) that TRL gave its fused LM head; `autocast`: the trainer's context."""
    logps, entropies, aux_losses = [], [], []
    for start in range(0, input_ids.size(0), batch_size):
        packed = pack_rows(input_ids[start:start + batch_size], attention_mask[start:start + batch_size],
                           logits_to_keep)
        inputs = dict(input_ids=packed.input_ids, attention_mask=packed.token_weights,
                      position_ids=packed.position_ids, shift_labels=packed.shift_labels, fused_lm_head=True,
                      shared_prefix_rows=packed.layout)
        if compute_aux_loss:
            inputs["output_router_logits"] = True
        with autocast():
            outputs = model(**inputs)
        logps.append(rows_of(outputs.log_probs, packed))
        if compute_entropy:
            entropies.append(rows_of(outputs.entropy, packed))
        if compute_aux_loss:
            aux_losses.append(outputs.aux_loss)
    return (torch.cat(logps), torch.cat(entropies) if compute_entropy else None,
            torch.stack(aux_losses).mean() if compute_aux_loss else None)


def rows_of(per_token, packed):
    """[1, T] per packed position -> [rows, completion_len] at each row's completion tokens, 0 past them."""
    return per_token[0][packed.score_index].masked_fill(~packed.score_valid, 0.0)
