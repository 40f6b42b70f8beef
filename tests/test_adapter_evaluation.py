"""Tests for adapters/adapter_evaluation.py and test_lora_adapter.py: metrics by hand, the report, and bad input."""

import contextlib
import json
import os
import time

import numpy as np
import pandas as pd
import pytest

from adapters import adapter_evaluation as ae
from training import evaluation
import harmony
import test_lora_adapter as evaluate_script
from lora_fixtures import (HARMONY_CSV, copy_adapter, make_adapter, make_foreign_adapter, set_lora_b,
                           write_prompt_subset)
from tiny_gpt_oss import ensure_tiny_model

# Three rows, four actions; the optimal actions (argmax Q) are 1, 0 and 2.
Q = [[1.0, 3.0, 2.0, 0.0], [5.0, 4.0, 4.5, 1.0], [0.0, 0.0, 2.0, 1.0]]
REWARDS = [[0.1, 0.6, 0.25, 0.05], [0.5, 0.2, 0.28, 0.02], [0.1, 0.1, 0.5, 0.3]]
CUT_OFF = f"{harmony.ANALYSIS_HEADER}I compare the CO2"  # no final message: invalid
BASE_ANSWERS = [[harmony.format_answer("a", 1), CUT_OFF],
                [harmony.format_answer("a", 2), harmony.format_answer("a", 0)],
                [harmony.format_answer("a", 3), harmony.format_answer("a", 2)]]
ADAPTER_ANSWERS = [[harmony.format_answer("a", 1), harmony.format_answer("a", 1)],
                   [harmony.format_answer("a", 0), harmony.format_answer("a", 0)],
                   [harmony.format_answer("a", 2), CUT_OFF]]
SETTINGS = dict(SAMPLES=2, TEMPERATURE=1.0, TOP_P=1.0, MAX_NEW_TOKENS=48, SEED=0, BATCH_SIZE=64)


def toy_frame():
    frame = pd.DataFrame({"row_id": [0, 1, 2], "prompt": ["p0", "p1", "p2"]})
    for a in range(4):
        frame[f"q_action_{a}"] = [row[a] for row in Q]
        frame[f"reward_action_{a}"] = [row[a] for row in REWARDS]
    return frame


class StubModel:
    """Stands in for a PeftModel: generation is stubbed, only disable_adapter() is needed."""

    def disable_adapter(self):
        return contextlib.nullcontext()


@pytest.fixture
def stubbed_generation(monkeypatch):
    """evaluation.generate_answers returns the base's fixed answers first, then the adapter's."""
    queue = [BASE_ANSWERS, ADAPTER_ANSWERS]
    monkeypatch.setattr(evaluation, "generate_answers", lambda *args, **kwargs: queue.pop(0))


@pytest.fixture(scope="module")
def tiny_dir():
    return ensure_tiny_model()


@pytest.fixture(scope="module")
def run_dir(tiny_dir, tmp_path_factory):
    return make_adapter(tmp_path_factory.mktemp("runs") / "attention-run")


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    return write_prompt_subset(tmp_path_factory.mktemp("prompts") / "held_out.csv", rows=3)


def run_main(main, argv, capsys):
    """Run a script's main, expecting it to exit; return (exit code, last stderr line)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    return exit_info.value.code, lines[-1] if lines else ""


def test_base_metrics_match_hand_computation(stubbed_generation):
    scores, actions, _ = ae.evaluate_base_and_adapter(StubModel(), None, toy_frame(), SETTINGS, log=lambda m: None)
    base = scores["base"]
    assert actions["base"].tolist() == [[1, -1], [2, 0], [3, 2]]
    assert base["valid_rate"] == pytest.approx(5 / 6)
    assert base["accuracy"] == pytest.approx(3 / 6)  # [1] on row 0, [0] on row 1, [2] on row 2
    assert base["mean_reward"] == pytest.approx((0.6 + 0 + 0.28 + 0.5 + 0.3 + 0.5) / 6)  # invalid earns 0
    # regrets: 0, worst of row 0 (3 - 0) for the invalid answer, 0.5, 0, 1, 0
    assert base["mean_regret"] == pytest.approx((0 + 3 + 0.5 + 0 + 1 + 0) / 6)
    assert base["action_distribution"] == pytest.approx({"0": 1 / 6, "1": 1 / 6, "2": 2 / 6, "3": 1 / 6,
                                                         "invalid": 1 / 6})
    expected_counts = np.zeros((4, 5), dtype=int)
    for optimal, chosen in ((1, 1), (1, 4), (0, 2), (0, 0), (2, 3), (2, 2)):
        expected_counts[optimal, chosen] += 1
    assert base["optimal_vs_predicted"] == expected_counts.tolist()


def test_adapter_metrics_and_delta_match_hand_computation(stubbed_generation):
    scores, actions, _ = ae.evaluate_base_and_adapter(StubModel(), None, toy_frame(), SETTINGS, log=lambda m: None)
    adapter = scores["adapter"]
    assert adapter["valid_rate"] == pytest.approx(5 / 6)
    assert adapter["accuracy"] == pytest.approx(5 / 6)
    assert adapter["mean_reward"] == pytest.approx((0.6 + 0.6 + 0.5 + 0.5 + 0.5 + 0) / 6)
    assert adapter["mean_regret"] == pytest.approx(2 / 6)  # only the invalid answer on row 2: 2 - 0
    delta = ae.compare_scores(scores["base"], adapter, actions["base"], actions["adapter"])
    assert delta["accuracy"] == pytest.approx(2 / 6)
    assert delta["mean_reward"] == pytest.approx((2.7 - 2.18) / 6)
    assert delta["mean_regret"] == pytest.approx((2 - 4.5) / 6)
    assert delta["same_action_rate"] == pytest.approx(2 / 6)  # (1, 1) on row 0 and (0, 0) on row 1


def test_paired_gain_is_the_mean_reward_difference_with_a_bootstrap_interval_over_prompts():
    frame = toy_frame()
    base = np.array([[0, 1], [1, 0], [-1, 2]])
    gain = evaluation.paired_gain(frame, base, base)
    assert gain["mean"] == 0 and gain["ci95"] == [0, 0]  # the same answers: no gain and no doubt
    better = np.array([[1, 1], [1, 1], [2, 2]])
    gain = evaluation.paired_gain(frame, base, better)
    rewards = evaluation.chosen_rewards(frame, better).mean() - evaluation.chosen_rewards(frame, base).mean()
    assert gain["mean"] == pytest.approx(rewards) and gain["prompts"] == 3
    assert gain["ci95"][0] <= gain["mean"] <= gain["ci95"][1]
    assert gain["ci95"] == evaluation.paired_gain(frame, base, better)["ci95"]  # seeded


def test_more_prompts_give_a_narrower_interval_for_the_same_per_prompt_gains():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(400, 4))
    rewards = np.exp(q) / np.exp(q).sum(axis=1, keepdims=True)
    frame = pd.DataFrame({f"q_action_{a}": q[:, a] for a in range(4)} | {f"reward_action_{a}": rewards[:, a]
                                                                          for a in range(4)})
    base = rng.integers(0, 4, size=(400, 4))
    trained = np.where(rng.random((400, 4)) < 0.5, q.argmax(axis=1)[:, None], base)
    wide = evaluation.paired_gain(frame.iloc[:16], base[:16], trained[:16])
    narrow = evaluation.paired_gain(frame, base, trained)
    assert narrow["ci95"][1] - narrow["ci95"][0] < 0.5 * (wide["ci95"][1] - wide["ci95"][0])
    assert narrow["ci95"][0] > 0  # half the answers switched to argmax Q: a real gain, and the interval says so


def test_reference_policies_match_hand_computation():
    references = evaluation.reference_scores(toy_frame())
    assert references["uniform"]["mean_reward"] == pytest.approx(0.25)
    assert references["uniform"]["mean_regret"] == pytest.approx((6 + 5.5 + 5) / 12)
    assert references["best_constant"]["action"] == 2  # column means 0.233, 0.3, 0.343, 0.123
    assert references["best_constant"]["mean_reward"] == pytest.approx(1.03 / 3)
    assert references["best_constant"]["accuracy"] == pytest.approx(1 / 3)
    assert references["best_constant"]["mean_regret"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert references["optimal"]["mean_reward"] == pytest.approx((0.6 + 0.5 + 0.5) / 3)


def test_newest_run_is_found_and_stand_ins_are_skipped(tmp_path):
    for name in ("older", "newer", "stand-ins"):
        (tmp_path / name).mkdir()
        (tmp_path / name / ae.ADAPTER_CONFIG).write_text("{}")
    (tmp_path / "no-adapter").mkdir()
    now = time.time()
    os.utime(tmp_path / "older" / ae.ADAPTER_CONFIG, (now - 100, now - 100))
    os.utime(tmp_path / "stand-ins" / ae.ADAPTER_CONFIG, (now + 100, now + 100))
    assert ae.find_newest_run(tmp_path) == tmp_path / "newer"


def test_max_prompts_spreads_rows_over_the_split():
    frame = ae.read_prompt_frame(HARMONY_CSV, "eval", 4)
    all_rows = ae.read_prompt_frame(HARMONY_CSV, "eval", 0)
    assert len(frame) == 4
    assert frame["row_id"].iat[0] == all_rows["row_id"].iat[0]
    assert frame["row_id"].iat[-1] == all_rows["row_id"].iat[-1]


def test_report_has_both_models_references_and_plots(run_dir, prompt_file):
    report = evaluate_script.main(["--adapter-path", str(run_dir), "--prompt-path", str(prompt_file),
                                   "--samples", "2", "--max-new-tokens", "48"])
    stored = json.loads((run_dir / "eval_report.json").read_text())
    assert stored["models"].keys() == {"base", "adapter"}
    for scores in stored["models"].values():
        assert {"valid_rate", "accuracy", "mean_reward", "mean_regret", "action_distribution",
                "optimal_vs_predicted"} <= scores.keys()
        assert scores["answers"] == 3 * 2
    assert stored["references"].keys() == {"uniform", "best_constant", "optimal"}
    assert stored["delta"]["mean_reward"] == pytest.approx(
        stored["models"]["adapter"]["mean_reward"] - stored["models"]["base"]["mean_reward"])
    assert stored["prompts"] == 3 and stored["adapter_fit"]["matches_recorded_base"]
    assert stored["training"]["steps_logged"] == 30
    for name in stored["plots"].values():
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (run_dir / "eval_summary.md").read_text()
    assert "base (adapter disabled)" in summary and "| adapter |" in summary and "optimal (argmax Q)" in summary
    assert len(pd.read_csv(run_dir / "eval_answers.csv")) == 2 * 3 * 2
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    assert report["models"]["adapter"] == stored["models"]["adapter"]
    low, high = stored["gain"]["ci95"]
    assert low <= stored["gain"]["mean"] <= high and stored["gain"]["prompts"] == 3
    assert stored["gain"]["mean"] == pytest.approx(stored["delta"]["mean_reward"])
    assert "95% interval" in summary


def test_missing_adapter_directory_exits_2(tmp_path, capsys):
    code, message = run_main(evaluate_script.main, ["--adapter-path", str(tmp_path / "nowhere")], capsys)
    assert code == 2
    assert message.startswith("error: ") and "no such adapter directory" in message


def test_adapter_for_another_base_exits_2_and_writes_nothing(tiny_dir, tmp_path, capsys):
    foreign = make_foreign_adapter(tmp_path / "foreign-run", tiny_dir, hidden_size=128)
    code, message = run_main(evaluate_script.main, ["--adapter-path", str(foreign)], capsys)
    assert code == 2
    assert "does not fit the base model" in message and "(8, 128)" in message and "(8, 64)" in message
    assert not (foreign / "eval_report.json").exists()


def test_adapter_saved_with_another_tokenizer_exits_2(run_dir, tmp_path, capsys):
    """An adapter trained on an earlier build of the base fits its shapes but not its vocabulary."""
    import shutil

    from transformers import AutoTokenizer

    stale = tmp_path / "stale-run"
    shutil.copytree(run_dir, stale)
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir))
    tokenizer.add_tokens(["<|not_in_the_base|>"])
    tokenizer.save_pretrained(str(stale))
    code, message = run_main(evaluate_script.main, ["--adapter-path", str(stale)], capsys)
    assert code == 2 and "tokenizer differs" in message


def test_prompt_file_without_q_columns_exits_2(run_dir, tmp_path, capsys):
    bad = write_prompt_subset(tmp_path / "no_q.csv", drop_columns=[f"q_action_{a}" for a in range(4)])
    code, message = run_main(evaluate_script.main, ["--adapter-path", str(run_dir), "--prompt-path", str(bad)], capsys)
    assert code == 2
    assert "not usable as a prompt file" in message and "q_action_" in message


def test_prompt_file_without_split_column_exits_2(run_dir, tmp_path, capsys):
    bad = write_prompt_subset(tmp_path / "no_split.csv", drop_columns=["split"])
    code, message = run_main(evaluate_script.main, ["--adapter-path", str(run_dir), "--prompt-path", str(bad)], capsys)
    assert code == 2
    assert "no `split` column" in message


def test_adapter_config_that_is_not_a_json_object_exits_2(run_dir, tmp_path, capsys):
    broken = copy_adapter(run_dir, tmp_path / "broken-run")
    (broken / ae.ADAPTER_CONFIG).write_text("[1, 2]")
    code, message = run_main(evaluate_script.main, ["--adapter-path", str(broken)], capsys)
    assert code == 2 and "adapter_config.json: holds a JSON list, not the object PEFT writes" in message


def test_truncated_adapter_weights_exit_2(run_dir, tmp_path, capsys):
    broken = copy_adapter(run_dir, tmp_path / "truncated-run")
    weights = broken / ae.ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-100])  # the header is whole, the data is not
    code, message = run_main(evaluate_script.main, ["--adapter-path", str(broken)], capsys)
    assert code == 2 and "truncated" in message and "copy the run again" in message


def test_nan_adapter_weights_exit_2_naming_the_diverged_run(run_dir, tmp_path, capsys):
    broken = set_lora_b(copy_adapter(run_dir, tmp_path / "nan-run"), float("nan"))
    code, message = run_main(evaluate_script.main, ["--adapter-path", str(broken)], capsys)
    assert code == 2 and "hold NaN or infinite values" in message and "checkpoint" in message
    assert not (broken / "eval_report.json").exists()


def test_adapter_weights_too_large_to_give_finite_logits_exit_2(run_dir, prompt_file, tmp_path, capsys):
    broken = set_lora_b(copy_adapter(run_dir, tmp_path / "huge-run"), 1e30)
    code, message = run_main(evaluate_script.main, ["--adapter-path", str(broken), "--prompt-path",
                                                    str(prompt_file)], capsys)
    assert code == 2 and "logits are NaN or infinite" in message
    assert not (broken / "eval_report.json").exists()


def test_an_adapter_from_a_moved_or_recloned_checkout_still_finds_its_base(run_dir, prompt_file, tmp_path, capsys):
    moved = copy_adapter(run_dir, tmp_path / "moved-run")
    config = json.loads((moved / ae.ADAPTER_CONFIG).read_text())
    config["base_model_name_or_path"] = "/an/old/clone/of/the/repository/runs/stand-ins/gpt-oss-tiny"
    (moved / ae.ADAPTER_CONFIG).write_text(json.dumps(config))
    report = evaluate_script.main(["--adapter-path", str(moved), "--prompt-path", str(prompt_file), "--samples",
                                   "1", "--max-prompts", "1", "--max-new-tokens", "8"])
    assert report["base_model"] == "tiny" and report["adapter_fit"]["matches_recorded_base"]
    assert "is not there; using tiny in this checkout" in capsys.readouterr().out


def test_an_adapter_recording_a_base_relative_to_the_repository_finds_it(tmp_path):
    import model_loader
    from tiny_gpt_oss import TINY_DIR

    relative = str(TINY_DIR.relative_to(model_loader.REPOSITORY))
    assert ae.resolve_base_model({"base_model_name_or_path": relative}, "", tmp_path) == str(TINY_DIR)
    assert ae.resolve_base_model({"base_model_name_or_path": "tiny"}, "", tmp_path) == "tiny"
    assert ae.resolve_base_model({"base_model_name_or_path": "openai/gpt-oss-20b"}, "", tmp_path) == \
        "openai/gpt-oss-20b"


def test_a_run_directory_that_cannot_be_written_exits_2_before_evaluating(run_dir, tmp_path, make_read_only,
                                                                          capsys):
    locked = make_read_only(copy_adapter(run_dir, tmp_path / "locked-run"))
    code, message = run_main(evaluate_script.main, ["--adapter-path", str(locked)], capsys)
    assert code == 2 and "cannot be written" in message


@pytest.mark.parametrize("flags, message", [(["--max-prompts", "-1"], "--max-prompts must be at least 0"),
                                            (["--samples", "0"], "--samples must be at least 1"),
                                            (["--temperature", "0"], "--temperature must be a number above 0"),
                                            (["--experts-format", "fp8"], "--experts-format 'fp8' is not one of")])
def test_settings_out_of_range_exit_2(run_dir, capsys, flags, message):
    code, last = run_main(evaluate_script.main, ["--adapter-path", str(run_dir)] + flags, capsys)
    assert code == 2 and message in last


def test_json_reports_are_strict_json(tmp_path):
    ae.write_json({"max_rel_diff": float("nan"), "values": [1.0, float("inf")]}, tmp_path / "report.json")
    def refuse(constant):
        raise ValueError(constant)

    assert json.loads((tmp_path / "report.json").read_text(), parse_constant=refuse) == {
        "max_rel_diff": None, "values": [1.0, None]}


def test_an_expert_lora_adapter_evaluates_on_mxfp4_experts_like_on_dequantised_ones(tmp_path, prompt_file):
    """The expert LoRA as low-rank terms beside MXFP4 experts: on a CPU the answers of PEFT's folded W + BA."""
    from lora_fixtures import make_adapter

    run = make_adapter(tmp_path / "expert-run", expert_lora=True, scale=0.3)
    flags = ["--adapter-path", str(run), "--prompt-path", str(prompt_file), "--samples", "2", "--max-new-tokens", "48"]
    dequantised = evaluate_script.main(flags)
    packed = evaluate_script.main(flags + ["--experts-format", "mxfp4"])
    assert packed["models"] == dequantised["models"]
    assert packed["models"]["adapter"] != packed["models"]["base"]  # the adapter changes the answers: it ran


def test_an_attention_adapter_evaluates_on_mxfp4_experts_like_on_dequantised_ones(run_dir, prompt_file):
    """Same prompts and seeds, experts kept in MXFP4: on a CPU the same answers (the reference path is exact)."""
    flags = ["--adapter-path", str(run_dir), "--prompt-path", str(prompt_file), "--samples", "2",
             "--max-new-tokens", "48"]
    dequantised = evaluate_script.main(flags)
    packed = evaluate_script.main(flags + ["--experts-format", "mxfp4"])
    assert packed["experts_format"] == "mxfp4" and dequantised["experts_format"] == "bf16"
    assert packed["models"] == dequantised["models"]
