"""training/best_checkpoint.py: which checkpoint a run keeps, the validation slice it is judged on, and putting the kept
adapter back into the model."""

import numpy as np
import pytest
import torch

from training import best_checkpoint
from lora_fixtures import HARMONY_CSV, perturb_lora_b


def entry(step, score, valid_rate=0.98):
    return {"step": step, "score": score, "valid_rate": valid_rate, "accuracy": 0.4}


def test_a_late_collapse_keeps_the_best_earlier_checkpoint_and_says_both_scores():
    history = [entry(100, 0.30), entry(200, 0.36), entry(300, 0.35), entry(800, 0.17, valid_rate=0.66)]
    kept, reason = best_checkpoint.choose_kept(history)
    assert kept["step"] == 200
    assert "0.360" in reason and "0.170" in reason and "0.660" in reason and "800" in reason


def test_the_last_checkpoint_is_kept_when_it_scores_best_and_ties_go_to_the_later_step():
    assert best_checkpoint.choose_kept([entry(1, 0.2), entry(2, 0.3)])[0]["step"] == 2
    kept, reason = best_checkpoint.choose_kept([entry(1, 0.3), entry(2, 0.3), entry(3, 0.1)])
    assert kept["step"] == 2 and "step 2" in reason
    assert "the last step scored best" in best_checkpoint.choose_kept([entry(1, 0.3), entry(2, 0.3)])[1]


def test_a_sudden_fall_of_the_valid_rate_is_called_a_collapse():
    assert "COLLAPSED" in best_checkpoint.describe_collapse(0.66, 0.98)
    assert best_checkpoint.describe_collapse(0.93, 0.98) == ""  # ordinary wobble
    assert best_checkpoint.describe_collapse(0.5, None) == ""  # nothing to compare with yet


@pytest.fixture(scope="module")
def train_split():
    from data_reward import validate_data_files
    from step_stream import make_pool

    (frame,) = validate_data_files([str(HARMONY_CSV)], require_rewards=True).values()
    train = frame[frame["split"] == "train"]
    return {HARMONY_CSV: train}, make_pool({HARMONY_CSV: train})[0], frame


def test_the_validation_slice_comes_from_the_training_split_only_and_is_fixed_by_the_seed(train_split):
    frames, pool, whole = train_split
    rows = best_checkpoint.pick_validation_rows(frames, pool, 64, seed=7)
    assert len(rows) == 64 and len(set(rows["prompt"])) == 64
    eval_prompts = set(whole.loc[whole["split"] == "eval", "prompt"])
    assert not set(rows["prompt"]) & eval_prompts and (rows["split"] == "train").all()
    again = best_checkpoint.pick_validation_rows(frames, pool, 64, seed=7)
    assert rows["prompt"].tolist() == again["prompt"].tolist()
    other = best_checkpoint.pick_validation_rows(frames, pool, 64, seed=8)
    assert rows["prompt"].tolist() != other["prompt"].tolist()


def test_prompts_the_stream_left_out_are_not_validated_on(train_split):
    frames, pool, _ = train_split
    rows = best_checkpoint.pick_validation_rows(frames, pool[:10], 64, seed=0)
    assert sorted(rows["prompt"]) == sorted(record["prompt"] for record in pool[:10])


def test_read_history_drops_the_scores_of_steps_after_the_resumed_checkpoint(tmp_path):
    (tmp_path / best_checkpoint.VALIDATION_FILE).write_text(
        '{"checkpoints": [{"step": 2, "score": 0.3}, {"step": 4, "score": 0.2}]}')
    assert [e["step"] for e in best_checkpoint.read_history(tmp_path, up_to_step=3)] == [2]
    assert best_checkpoint.read_history(tmp_path / "nothing-here") == []


def test_the_kept_checkpoints_adapter_goes_back_into_the_model(tmp_path):
    """best_checkpoint.keep_best_adapter on a real tiny PEFT model: checkpoint-2 scored best, checkpoint-4 is the last."""
    from peft import get_peft_model

    import model_loader
    import train_grpo

    settings = {name: getattr(train_grpo, name) for name in train_grpo.SETTINGS} | train_grpo.TINY_SETTINGS
    model = get_peft_model(model_loader.load_model("tiny"), train_grpo.lora_config(settings))
    weights = {}
    for step, seed in ((2, 0), (4, 1)):
        perturb_lora_b(model, 0.05, seed=seed)
        model.save_pretrained(tmp_path / f"checkpoint-{step}")
        weights[step] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    class Scored:  # what the validation callback holds at the end of a run
        history = [entry(2, 0.35), entry(4, 0.12, valid_rate=0.6)]
        frame, samples = list(range(16)), 2

    said = []
    kept = best_checkpoint.keep_best_adapter(model, Scored, tmp_path, said.append)
    assert kept["step"] == 2 and kept["last_scores"]["step"] == 4
    assert "kept the adapter of step 2" in said[0] and "checkpoint-4" in said[0]
    now = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert all(torch.equal(now[n], weights[2][n]) for n in now)
    assert not all(torch.equal(now[n], weights[4][n]) for n in now)
    assert np.isclose(kept["kept_scores"]["score"], 0.35)


def test_a_best_checkpoint_whose_adapter_no_longer_reads_is_passed_over(tmp_path):
    """The best score's checkpoint lost half its adapter file (a broken copy): the last step's adapter, the one in
    memory, is kept, and the log says why; nothing is loaded from the broken file."""
    from peft import get_peft_model

    import model_loader
    import train_grpo

    settings = {name: getattr(train_grpo, name) for name in train_grpo.SETTINGS} | train_grpo.TINY_SETTINGS
    model = get_peft_model(model_loader.load_model("tiny"), train_grpo.lora_config(settings))
    model.save_pretrained(tmp_path / "checkpoint-2")
    weights = tmp_path / "checkpoint-2" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    class Scored:
        history = [entry(2, 0.35), entry(4, 0.12)]
        frame, samples = list(range(16)), 2

    said = []
    kept = best_checkpoint.keep_best_adapter(model, Scored, tmp_path, said.append)
    assert kept["step"] == 4 and "not keeping checkpoint-2 whatever its score: adapter_model.safetensors" in said[0]


def test_a_checkpoint_of_another_adapter_shape_is_refused_with_what_to_do(tmp_path):
    from peft import get_peft_model

    import model_loader
    import train_grpo

    settings = {name: getattr(train_grpo, name) for name in train_grpo.SETTINGS} | train_grpo.TINY_SETTINGS
    experts = get_peft_model(model_loader.load_model("tiny"), train_grpo.lora_config(settings | {"LORA_EXPERTS": True}))
    experts.save_pretrained(tmp_path / "checkpoint-2")
    attention_only = get_peft_model(model_loader.load_model("tiny"),
                                    train_grpo.lora_config(settings | {"LORA_EXPERTS": False}))
    with pytest.raises(RuntimeError, match=r"checkpoint-2: adapter weights .*experts.* another run's adapter; move it"):
        best_checkpoint.load_checkpoint_adapter(attention_only, tmp_path / "checkpoint-2")
