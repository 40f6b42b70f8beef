"""The rewards GRPO trains on, in TRL's contract: the Boltzmann action reward and the format reward, each parsing a
completion once with harmony.parse_final_action; their names, weights and the metric TRL logs them under."""

from harmony import parse_final_action


def decode_completions(tokenizer, completion_ids):
    """TRL decodes completions with skip_special_tokens=True, which erases the Harmony channel markers;
    the rewards decode the token ids themselves, markers kept."""
    return tokenizer.batch_decode(completion_ids, skip_special_tokens=False)


REWARD_NAMES = ("action_reward", "format_reward")  # make_reward_functions' rewards, in its order; each weighs 1


def reward_metric(name="action_reward"):
    """The mean TRL logs for the reward function `name` (its __name__)."""
    return f"rewards/{name}/mean"


def score_actions(tokenizer, completion_ids, action_rewards):
    """(texts with the Harmony markers, parsed actions, action rewards: None for an invalid answer) of completions,
    as the action reward scores them; action_rewards: each completion's row of reward_action_<a>."""
    texts = decode_completions(tokenizer, completion_ids)
    actions = [parse_final_action(text, len(row)) for text, row in zip(texts, action_rewards)]
    return texts, actions, [None if a is None else float(row[a]) for a, row in zip(actions, action_rewards)]


def reward_weights():
    """GRPOConfig.reward_weights: the rewards are summed, one weight per function of make_reward_functions."""
    return [1.0] * len(REWARD_NAMES)


def make_reward_functions(tokenizer, format_penalty=1.0):
    """The two rewards GRPO trains on: the Boltzmann action reward and the format reward.

    - `action_reward`: reward_action_<a> of the action in the final message; None for an invalid answer (the data
      has no reward for 'no action'). In TRL 1.x a completion for which *every* reward returns None is
      'unscorable' and gets advantage 0, so on its own this would let the format drift unpunished.
    - `format_reward`: 0 for a valid answer, -format_penalty for an invalid one. Summed with the action reward
      (TRL's default aggregation) an invalid answer scores -format_penalty and sits below every valid one in its
      group, which keeps the valid-answer rate up.
    Both parse each completion once (cached per batch) with harmony.parse_final_action. They only score: the
    trainer logs the completions (grpo_trainer.TesGRPOTrainer, completion_log.py).
    """
    # The batch last parsed, held by reference: TRL hands both rewards the same list object. Keyed by the object, not
    # by id(): a freed list's id is reused by the next batch's list, which would then get the old batch's parses.
    cache = {"batch": None, "scored": None}

    def score(completion_ids, action_rewards):
        if cache["batch"] is not completion_ids:
            cache["scored"] = score_actions(tokenizer, completion_ids, action_rewards)
            cache["batch"] = completion_ids
        return cache["scored"]

    def action_reward(prompts, completions, completion_ids, action_rewards, **kwargs):
        _, actions, rewards = score(completion_ids, action_rewards)
        log_metric, optimal = kwargs.get("log_metric"), kwargs.get("optimal_action")
        if log_metric is not None:
            log_metric("valid_rate", sum(a is not None for a in actions) / len(actions))
            if optimal is not None:
                log_metric("accuracy", sum(a == o for a, o in zip(actions, optimal)) / len(actions))
        return rewards

    def format_reward(prompts, completions, completion_ids, action_rewards, **kwargs):
        _, actions, _ = score(completion_ids, action_rewards)
        return [0.0 if a is not None else -float(format_penalty) for a in actions]

    functions = [action_reward, format_reward]
    assert tuple(f.__name__ for f in functions) == REWARD_NAMES  # the names TRL logs them under
    return functions
