"""The rewards read the final Harmony message from completion token ids: a table of real token sequences."""

import pytest

import harmony
from training.rewards import make_reward_functions
from tiny_gpt_oss import load_tiny_tokenizer

REWARDS = [0.1, 0.2, 0.3, 0.4]  # reward_action_0..3 of the prompt being answered
A = "<|channel|>analysis<|message|>"
F = "<|start|>assistant<|channel|>final<|message|>"

# (case, completion text as the model writes it, parsed action or None when invalid)
CASES = [
    ("analysis then final", f"{A}CO2 is low now.<|end|>{F}[1]<|return|>", 1),
    ("analysis mentioning another action", f"{A}Maybe [3], or [0]?<|end|>{F}[2]<|return|>", 2),
    ("final without analysis", "<|channel|>final<|message|>[0]<|return|>", 0),
    ("whitespace around the answer", f"{A}ok<|end|>{F} [2]\n<|return|>", 2),
    ("a two-digit action in range of a larger set is still out of range here", f"{A}ok<|end|>{F}[10]<|return|>", None),
    ("spaces inside the brackets", f"{A}ok<|end|>{F}[ 2 ]<|return|>", None),
    ("words around the action", f"{A}ok<|end|>{F}I choose [3].<|return|>", None),
    ("trailing text", f"{A}ok<|end|>{F}[2]x<|return|>", None),
    ("a leading zero", f"{A}ok<|end|>{F}[01]<|return|>", None),
    ("two zeros", f"{A}ok<|end|>{F}[00]<|return|>", None),
    ("full-width zero", f"{A}ok<|end|>{F}[０]<|return|>", None),
    ("full-width one", f"{A}ok<|end|>{F}[１]<|return|>", None),
    ("Arabic-Indic three", f"{A}ok<|end|>{F}[٣]<|return|>", None),
    ("mathematical bold two", f"{A}ok<|end|>{F}[𝟐]<|return|>", None),
    ("padding after the answer", f"{A}ok<|end|>{F}[1]<|return|><|endoftext|><|endoftext|>", 1),
    ("out of range", f"{A}ok<|end|>{F}[12]<|return|>", None),
    ("two different actions", f"{A}ok<|end|>{F}[1] or [2]<|return|>", None),
    ("the same action twice", f"{A}ok<|end|>{F}[1] [1]<|return|>", None),
    ("two final messages", f"{A}ok<|end|>{F}[1]<|end|>{F}[2]<|return|>", None),
    ("empty final message", f"{A}ok<|end|>{F}<|return|>", None),
    ("no brackets", f"{A}ok<|end|>{F}2<|return|>", None),
    ("truncated final message", f"{A}ok<|end|>{F}[2]", None),
    ("truncated in the analysis, which mentions [3]", f"{A}I think [3] is", None),
    ("analysis only", f"{A}I pick [3].<|end|>", None),
    ("tool call ending", f"{A}ok<|end|>{F}[2]<|call|>", None),
    ("negative number", f"{A}ok<|end|>{F}[-1]<|return|>", None),
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tiny_tokenizer()


@pytest.fixture(scope="module")
def rewards(tokenizer):
    return make_reward_functions(tokenizer, format_penalty=1.0)


@pytest.mark.parametrize("case,text,expected", CASES, ids=[c[0] for c in CASES])
def test_action_reward_reads_the_final_message_only(tokenizer, rewards, case, text, expected):
    action_reward, format_reward = rewards
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=False) == text  # a real token sequence of the tokenizer
    got = action_reward(prompts=["p"], completions=["c"], completion_ids=[ids], action_rewards=[REWARDS])
    assert got == [None if expected is None else REWARDS[expected]]
    penalty = format_reward(prompts=["p"], completions=["c"], completion_ids=[ids], action_rewards=[REWARDS])
    assert penalty == [0.0 if expected is not None else -1.0]


def test_trl_decoded_text_has_lost_the_channel_markers(tokenizer):
    """Why the rewards decode completion_ids themselves: TRL's `completions` skip special tokens."""
    text = f"{A}Maybe [3].<|end|>{F}[1]<|return|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    assert "<|channel|>" not in decoded and "[3]" in decoded
    assert harmony.parse_final_action(decoded, 4) is None


def test_format_penalty_is_a_constant_weight(tokenizer):
    _, format_reward = make_reward_functions(tokenizer, format_penalty=0.5)
    bad = tokenizer(f"{A}cut off", add_special_tokens=False)["input_ids"]
    assert format_reward(prompts=["p"], completions=["c"], completion_ids=[bad], action_rewards=[REWARDS]) == [-0.5]


def test_invalid_answer_scores_below_every_valid_one_in_the_summed_reward(tokenizer, rewards):
    """TRL sums the rewards (None counts as missing): an invalid answer must not be 'unscorable' (advantage 0)."""
    action_reward, format_reward = rewards
    texts = [f"{A}ok<|end|>{F}[{a}]<|return|>" for a in range(4)] + [f"{A}cut"]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    kwargs = dict(prompts=["p"] * 5, completions=["c"] * 5, completion_ids=ids, action_rewards=[REWARDS] * 5)
    summed = [(a or 0.0) + f for a, f in zip(action_reward(**kwargs), format_reward(**kwargs))]
    assert summed[4] < min(summed[:4])
    assert all(f is not None for f in format_reward(**kwargs))  # never all-None for a row


def test_reward_logs_valid_rate_and_accuracy(tokenizer, rewards):
    action_reward, _ = rewards
    logged = {}
    texts = [f"{F}[0]<|return|>", f"{F}[1]<|return|>", f"{A}cut", f"{F}[1]<|return|>"]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    action_reward(prompts=["p"] * 4, completions=["c"] * 4, completion_ids=ids, action_rewards=[REWARDS] * 4,
                  optimal_action=[1, 1, 1, 0], log_metric=lambda name, value: logged.__setitem__(name, value))
    assert logged == {"valid_rate": 0.75, "accuracy": 0.25}


def test_each_batch_is_scored_by_its_own_parse_when_lists_are_freed_between_calls(tokenizer):
    """TRL builds a new list of completion ids for every batch and frees the last one: CPython then often gives the
    new list the freed one's id. A parse cached under id() scored such a batch with the previous batch's actions."""
    action_reward, format_reward = make_reward_functions(tokenizer, format_penalty=1.0)
    valid = tokenizer(f"{A}ok<|end|>{F}[1]<|return|>", add_special_tokens=False)["input_ids"]
    invalid = tokenizer(f"{A}ok<|end|>{F}<|return|>", add_special_tokens=False)["input_ids"]
    for call in range(400):
        batch = [list(valid if call % 2 == 0 else invalid)]
        expected = REWARDS[1] if call % 2 == 0 else None
        assert action_reward(prompts=["p"], completions=["c"], completion_ids=batch, action_rewards=[REWARDS]) == \
            [expected], f"call {call}"
        assert format_reward(prompts=["p"], completions=["c"], completion_ids=batch, action_rewards=[REWARDS]) == \
            [0.0 if expected is not None else -1.0], f"call {call}"
        del batch


def test_reward_weights_and_metric_names_come_from_the_reward_list():
    """train_grpo.grpo_config's reward_weights and the metric it reads are built from make_reward_functions' list: a reward
    added or renamed there changes both (TRL logs each function under rewards/<its __name__>/mean)."""
    from training import rewards

    functions = rewards.make_reward_functions(tokenizer=None)
    assert len(rewards.reward_weights()) == len(functions)
    assert [rewards.reward_metric(f.__name__) for f in functions] == [
        "rewards/action_reward/mean", "rewards/format_reward/mean"]
