"""StepStream: seeded, no repeats before the pool is exhausted, fair across files, one GRPO group per prompt."""

import itertools
from collections import Counter

import pandas as pd
import pytest

from step_stream import StepStream, make_pool, order_epoch


def make_frame(n, tag, prompt_len=3):
    return pd.DataFrame({
        "row_id": range(n),
        "prompt": [f"{tag} prompt {i} " + "word " * prompt_len for i in range(n)],
        **{f"q_action_{a}": [float(a + i) for i in range(n)] for a in range(3)},
        **{f"reward_action_{a}": [[0.2, 0.3, 0.5][a]] * n for a in range(3)},
    })


def take(stream, n):
    return list(itertools.islice(iter(stream), n))


def test_no_prompt_repeats_before_the_pool_is_exhausted():
    pool, _ = make_pool({"a.csv": make_frame(30, "a"), "b.csv": make_frame(10, "b")})
    records = take(StepStream(pool, seed=1), 80)
    first, second = [r["prompt_id"] for r in records[:40]], [r["prompt_id"] for r in records[40:]]
    assert len(set(first)) == 40 and len(set(second)) == 40
    assert first != second  # each epoch is a fresh permutation


def test_files_are_drawn_in_proportion_to_their_size_throughout_an_epoch():
    pool, _ = make_pool({"a.csv": make_frame(30, "a"), "b.csv": make_frame(10, "b")})
    records = take(StepStream(pool, seed=3), 40)
    for start in range(0, 40, 8):
        window = Counter(r["file"] for r in records[start:start + 8])
        assert window["b"] in (1, 2, 3), window  # 2 expected in every 8, never a long run of one file


def test_the_stream_is_seeded():
    pool, _ = make_pool({"a.csv": make_frame(20, "a")})
    ids = lambda seed: [r["prompt_id"] for r in take(StepStream(pool, seed=seed), 20)]  # noqa: E731
    assert ids(5) == ids(5)
    assert ids(5) != ids(6)


def test_epoch_order_is_a_permutation():
    import numpy as np

    files = ["a"] * 7 + ["b"] * 3 + ["c"] * 5
    order = order_epoch(files, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(15))


def test_records_carry_rewards_q_values_and_the_optimal_action():
    pool, _ = make_pool({"data/x.csv": make_frame(4, "x")})
    record = pool[2]
    assert record["prompt_id"] == "x:2"
    assert record["action_rewards"] == [0.2, 0.3, 0.5]
    assert record["q_values"] == [2.0, 3.0, 4.0]
    assert record["optimal_action"] == 2


def test_too_long_prompts_are_left_out_and_reported_by_file_and_row():
    from tiny_gpt_oss import load_tiny_tokenizer

    frame = make_frame(5, "a")
    frame.loc[3, "prompt"] = "a very long prompt " * 200
    pool, too_long = make_pool({"a.csv": frame}, load_tiny_tokenizer(), max_prompt_len=100)
    assert len(pool) == 4 and "a:3" not in {r["prompt_id"] for r in pool}
    assert len(too_long) == 1 and too_long[0].startswith("a.csv:5: ")  # header is row 1, frame row 3 is row 5


def test_empty_pool_is_refused():
    with pytest.raises(ValueError, match="no prompts"):
        StepStream([], seed=0)


def test_each_grpo_group_is_one_prompt_with_its_own_rewards_and_no_prompt_is_repeated():
    """Feed the stream through TRL's own repetition (what GRPOTrainer does with an IterableDataset)."""
    from trl.trainer.utils import repeat_iterable_dataset

    frame = make_frame(12, "a")
    frame["reward_action_0"] = [0.01 * i for i in range(12)]  # a different reward row per prompt
    frame["reward_action_2"] = 0.8 - frame["reward_action_0"]
    pool, _ = make_pool({"a.csv": frame})
    generations, prompts_per_step = 4, 3
    dataset = repeat_iterable_dataset(StepStream(pool, seed=0).as_dataset(), mini_repeat_count=generations,
                                      batch_size=prompts_per_step, repeat_count=1)
    records = list(itertools.islice(iter(dataset), 12 * generations))
    groups = [records[i:i + generations] for i in range(0, len(records), generations)]
    for group in groups:
        assert len({r["prompt_id"] for r in group}) == 1
        assert all(r["action_rewards"] == group[0]["action_rewards"] for r in group)
        assert group[0]["action_rewards"][0] == pytest.approx(0.01 * int(group[0]["prompt_id"].split(":")[1]))
    assert len({g[0]["prompt_id"] for g in groups}) == 12  # 12 groups, 12 different prompts: none twice over
