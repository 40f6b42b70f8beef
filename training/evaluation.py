"""Evaluate a policy on held-out prompts: sample answers, parse them like the reward does, and score them.

Shared by train_grpo.py (its before/after summary) and test_lora_adapter*.py (the full report).

Metrics, per model, on the same prompts and sampling seeds:
- valid rate: answers whose final message holds exactly one action in range (harmony.parse_final_action);
- accuracy: answers that chose argmax Q (invalid answers count as wrong);
- mean reward: the Boltzmann reward of the chosen action, reward_action_<a>; an invalid answer earns 0;
- mean regret: max Q - Q of the chosen action, in the data's Q units; an invalid answer gets the row's worst
  regret (max Q - min Q), as if the controller had done the worst thing;
- the action distribution and a predicted-versus-optimal count table.
References on the same rows: uniform guessing (mean reward over the actions), the best single constant action,
and the optimal policy (argmax Q).
"""

import time

import numpy as np
import pandas as pd
import torch

import harmony
from data_reward import optimal_actions, q_matrix, reward_matrix
from training import generation


def generate_answers(model, tokenizer, prompts, samples=4, temperature=1.0, top_p=1.0, max_new_tokens=64,
                     seed=0, batch_size=64, stop_ids=None, backend="auto", log=None, generator=None):
    """Sample `samples` Harmony completions for every prompt; returns answers[prompt][sample] with special tokens.

    Seeds are fixed per batch, so two models evaluated with the same arguments see the same random streams.
    generator: the run's generation.Generator over `model` (its engine shared with training); else one is made for
    `backend`, a generation.BACKENDS name or 'auto' (generation.resolve: the engine on a GPU when it runs the model).
    """
    if generator is None:
        device = next(model.parameters()).device
        generator = generation.Generator(generation.resolve(backend, model, device), model, tokenizer, stop_ids)
    elif stop_ids is not None and sorted(stop_ids) != sorted(generator.stop_ids):
        raise ValueError(f"stop_ids {stop_ids} differ from the generator's {generator.stop_ids}")
    jobs = [(i, prompt) for i, prompt in enumerate(prompts) for _ in range(samples)]
    answers = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    generator.release()  # training's caches go before this phase's are made, and this phase's after it
    start = last_log = time.time()
    for b, first in enumerate(range(0, len(jobs), batch_size)):
        batch = jobs[first:first + batch_size]
        torch.manual_seed(seed + b)
        completions = generator.sample([p for _, p in batch], temperature, top_p, max_new_tokens)
        for (i, _), ids in zip(batch, completions):
            answers[i].append(decode_completion(tokenizer, ids, generator.stop_ids))
        done = min(first + batch_size, len(jobs))
        if log and (time.time() - last_log > 15 or done == len(jobs)):  # a line every 15 s, whatever the model
            last_log = time.time()
            log(f"  generated {done}/{len(jobs)} answers ({last_log - start:.0f} s)")
    generator.release()
    model.train(was_training)
    return answers


def decode_completion(tokenizer, ids, stop_ids):
    """Completion token ids -> text with special tokens, cut after the first stop token (drops padding)."""
    for k, token in enumerate(ids):
        if token in stop_ids:
            ids = ids[:k + 1]
            break
    return tokenizer.decode(ids, skip_special_tokens=False)


def parse_answers(answers, num_actions):
    """answers[prompt][sample] -> int array [prompts, samples] of chosen actions, -1 where invalid."""
    parsed = [[harmony.parse_final_action(a, num_actions) for a in row] for row in answers]
    return np.array([[-1 if a is None else a for a in row] for row in parsed], dtype=np.int64)


def chosen_rewards(frame, actions):
    """The Boltzmann reward of each chosen action [prompts, samples]; an invalid answer (-1) earns 0."""
    rewards = reward_matrix(frame)
    valid = actions >= 0
    return np.where(valid, rewards[np.arange(len(frame))[:, None], np.where(valid, actions, 0)], 0.0)


def paired_gain(frame, reference_actions, other_actions, resamples=2000, seed=0):
    """Mean reward of `other` minus `reference` on the same prompts and seeds, with a paired 95% bootstrap interval.

    The bootstrap resamples prompts, not answers: answers to one prompt are alike, and both policies answered the
    same prompts, so the per-prompt difference is the unit that varies. With 16 prompts a gain of +0.06 can have
    an interval that reaches below 0; with the 576 held-out prompts of the stand-in's data it is about +-0.02.
    """
    diff = (chosen_rewards(frame, np.asarray(other_actions)).mean(axis=1)
            - chosen_rewards(frame, np.asarray(reference_actions)).mean(axis=1))
    picks = np.random.default_rng(seed).integers(0, len(diff), size=(resamples, len(diff)))
    low, high = np.percentile(diff[picks].mean(axis=1), [2.5, 97.5])
    return {"mean": float(diff.mean()), "ci95": [float(low), float(high)], "prompts": len(diff),
            "resamples": resamples}


def score_actions(frame, actions):
    """Metrics of chosen actions [prompts, samples] (-1 = invalid) on the rows of `frame`."""
    rewards, q, best = reward_matrix(frame), q_matrix(frame), optimal_actions(frame)
    n_actions = rewards.shape[1]
    valid = actions >= 0
    safe = np.where(valid, actions, 0)
    rows = np.arange(len(frame))[:, None]
    chosen_reward = chosen_rewards(frame, actions)
    worst_regret = (q.max(axis=1) - q.min(axis=1))[:, None]
    chosen_regret = np.where(valid, q.max(axis=1)[:, None] - q[rows, safe], worst_regret)
    counts = np.zeros((n_actions, n_actions + 1), dtype=np.int64)  # [optimal, predicted or invalid(last)]
    for a_opt, row in zip(best, actions):
        for a in row:
            counts[a_opt, a if a >= 0 else n_actions] += 1
    return {
        "answers": int(actions.size),
        "valid_rate": float(valid.mean()),
        "accuracy": float((actions == best[:, None]).mean()),
        "mean_reward": float(chosen_reward.mean()),
        "mean_regret": float(chosen_regret.mean()),
        "action_distribution": {str(a): float((actions == a).mean()) for a in range(n_actions)} | {
            "invalid": float((~valid).mean())},
        "optimal_vs_predicted": counts.tolist(),
    }


def reference_scores(frame):
    """What uniform guessing, the best single constant action and the optimal policy earn on these rows."""
    rewards, q, best = reward_matrix(frame), q_matrix(frame), optimal_actions(frame)
    rows = np.arange(len(frame))
    constant = rewards.mean(axis=0)
    best_constant = int(constant.argmax())
    regret = q.max(axis=1)[:, None] - q
    return {
        "uniform": {"mean_reward": float(rewards.mean()), "accuracy": 1.0 / rewards.shape[1],
                    "mean_regret": float(regret.mean())},
        "best_constant": {"action": best_constant, "mean_reward": float(constant[best_constant]),
                          "accuracy": float((best == best_constant).mean()),
                          "mean_regret": float(regret[:, best_constant].mean())},
        "optimal": {"mean_reward": float(rewards[rows, best].mean()), "accuracy": 1.0, "mean_regret": 0.0},
    }


def evaluate_model(model, tokenizer, frame, samples=4, temperature=1.0, top_p=1.0, max_new_tokens=64, seed=0,
                   batch_size=64, backend="auto", log=None, generator=None):
    """Sample, parse and score one model on the rows of `frame` (its `prompt` column must be Harmony)."""
    answers = generate_answers(model, tokenizer, frame["prompt"].tolist(), samples, temperature, top_p,
                               max_new_tokens, seed, batch_size, backend=backend, log=log,
                               generator=generator)
    actions = parse_answers(answers, reward_matrix(frame).shape[1])
    return score_actions(frame, actions), answers, actions


def evaluate_held_out(model, tokenizer, held_out, samples, max_new_tokens, seed, generator, log, max_prompts=0,
                      batch_size=64):
    """Untrained (adapter disabled) and trained policy on the held-out split (frames by file), same prompts and
    seeds, at temperature 1.0, `batch_size` answers a pass: the end of a training run (train_grpo.py)."""
    frame = pd.concat(list(held_out.values()), ignore_index=True)
    if max_prompts:
        frame = frame.iloc[:max_prompts]
    kwargs = dict(samples=samples, temperature=1.0, max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size,
                  generator=generator, log=log)
    log(f"held-out evaluation: {len(frame)} prompts x {samples} answers, untrained policy")
    with model.disable_adapter():
        untrained, _, untrained_actions = evaluate_model(model, tokenizer, frame, **kwargs)
    log("held-out evaluation: trained policy")
    trained, _, trained_actions = evaluate_model(model, tokenizer, frame, **kwargs)
    return {"prompts": len(frame), "samples": samples, "temperature": 1.0,
            "untrained": untrained, "trained": trained, "references": reference_scores(frame),
            "gain": paired_gain(frame, untrained_actions, trained_actions, seed=seed)}
