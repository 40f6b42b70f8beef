"""data/make_tes_dataset.py: the DP on a hand-checked case, the profiles, and the committed CSV."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # so a bare `pytest` finds the modules
import calculate_reward  # noqa: E402
import data_reward  # noqa: E402

SPEC = importlib.util.spec_from_file_location("make_tes_dataset", REPO / "data" / "make_tes_dataset.py")
gen = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(gen)

COMMITTED = REPO / "data" / gen.OUTPUT_NAME

# Three hours, three tank levels (0, 25, 50 kWh), COP 1, load 50 kWh every hour; charging stores
# 25 kWh for 50 kWh of cold (efficiency 0.5); pumps 1 kWh at full flow, 0.5 at half.
TINY = gen.Tank(capacity_kwh=50, step_kwh=25, charge_kwh=25, charge_efficiency=0.5,
                discharge_kwh=50, pump_full_kwh=1.0, pump_half_kwh=0.5)
TINY_CO2 = np.array([0.1, 1.0, 0.5])
TINY_LOAD = np.array([50, 50, 50])
TINY_COP = np.array([1.0, 1.0, 1.0])
# Worked by hand, last hour first; Q = -co2 * (cold / cop + pump) + V(next level).
# Hour 2 (co2 0.5, V3 = 0):
#   level 0:  idle -0.5*50 = -25; charge -0.5*(50+25/0.5+1) = -50.5;
#             discharge (nothing to give) -0.5*(50+1) = -25.5; half -0.5*(50+0.5) = -25.25
#   level 25: idle -25; charge -50.5; discharge 25 -> -0.5*(25+1) = -13;
#             half: 25//2 rounds down to 0 -> -25.25
#   level 50: idle -25; charge (full: stores 0) -25.5; discharge 50 -> -0.5*1 = -0.5;
#             half 25 -> -0.5*(25+0.5) = -12.75
#   V2 = [-25, -13, -0.5]
# Hour 1 (co2 1.0):
#   level 0:  idle -50-25 = -75; charge -101-13 = -114; discharge -51-25 = -76; half -50.5-25 = -75.5
#   level 25: idle -50-13 = -63; charge -101-0.5 = -101.5; discharge -26-25 = -51; half -50.5-13 = -63.5
#   level 50: idle -50-0.5 = -50.5; charge -51-0.5 = -51.5; discharge -1-25 = -26; half -25.5-13 = -38.5
#   V1 = [-75, -51, -26]
# Hour 0 (co2 0.1):
#   level 0:  idle -5-75 = -80; charge -10.1-51 = -61.1; discharge -5.1-75 = -80.1; half -5.05-75 = -80.05
#   level 25: idle -5-51 = -56; charge -10.1-26 = -36.1; discharge -2.6-75 = -77.6; half -5.05-51 = -56.05
#   level 50: idle -5-26 = -31; charge -5.1-26 = -31.1; discharge -0.1-75 = -75.1; half -2.55-51 = -53.55
TINY_Q = np.array([
    [[-80, -61.1, -80.1, -80.05], [-56, -36.1, -77.6, -56.05], [-31, -31.1, -75.1, -53.55]],
    [[-75, -114, -76, -75.5], [-63, -101.5, -51, -63.5], [-50.5, -51.5, -26, -38.5]],
    [[-25, -50.5, -25.5, -25.25], [-25, -50.5, -13, -25.25], [-25, -25.5, -0.5, -12.75]],
])


@pytest.fixture(scope="module")
def committed():
    """The committed data set, validated (rewards required)."""
    return data_reward.validate_data_files([COMMITTED])[COMMITTED]


def generate(directory):
    """Run the full regeneration command into directory and return the CSV's bytes."""
    out = directory / gen.OUTPUT_NAME
    gen.main(["--out", str(out)])
    assert calculate_reward.main([str(out), "--tau", "0.05"]) == 0
    return out.read_bytes()


def test_dp_matches_the_hand_computed_three_hour_case():
    q = gen.solve_q_values(TINY_CO2, TINY_LOAD, TINY_COP, TINY)
    assert q == pytest.approx(TINY_Q, abs=1e-12)


def test_dp_value_is_the_best_action_plus_the_best_future():
    # optimal plan from an empty tank: charge at the clean hour 0, discharge at the dirty hour 1
    q = gen.solve_q_values(TINY_CO2, TINY_LOAD, TINY_COP, TINY)
    assert q[0, 0].argmax() == gen.CHARGE and q[1, 1].argmax() == gen.DISCHARGE
    assert q[0, 0].max() == pytest.approx(-(0.1 * 101) - (1.0 * 26) - (0.5 * 50))


@pytest.mark.parametrize("action", range(4))
def test_the_tank_never_leaves_empty_or_full(action):
    tank = gen.Tank()
    for level in range(0, tank.capacity_kwh + 1, tank.step_kwh):
        for load in (50, 100, 350, 450):
            after, cold, pump = gen.step_tank(level, load, action, tank)
            assert 0 <= after <= tank.capacity_kwh and after % tank.step_kwh == 0
            assert cold >= 0 and pump >= 0


def test_clipped_actions_cost_more_than_idle():
    tank = gen.Tank()
    full, empty = tank.capacity_kwh, 0
    idle_cold = gen.step_tank(full, 100, gen.IDLE, tank)[1]
    assert gen.step_tank(full, 100, gen.CHARGE, tank)[:2] == (full, idle_cold)
    assert gen.step_tank(full, 100, gen.CHARGE, tank)[2] > 0
    for action in (gen.DISCHARGE, gen.HALF_DISCHARGE):
        after, cold, pump = gen.step_tank(empty, 100, action, tank)
        assert (after, cold) == (empty, 100) and pump > 0


def test_profiles_have_the_documented_shape():
    co2, load, cop = gen.make_co2_factors(), gen.make_cooling_loads(), gen.make_cops()
    assert len(co2) == len(load) == len(cop) == 72
    for day in range(3):
        hours = slice(24 * day, 24 * day + 24)
        assert co2[hours].argmin() in (12, 13) and 19 <= co2[hours].argmax() <= 21
        assert load[hours][:7].max() == gen.LOAD_BASE_KWH and 13 <= load[hours].argmax() <= 16
        assert cop[hours].argmax() == gen.COP_BEST_HOUR
    assert 0.2 < co2.min() and co2.max() < 0.6
    assert (load % gen.LOAD_STEP_KWH == 0).all()


def test_the_eval_split_holds_the_same_number_of_levels_every_hour():
    assert all(len(gen.choose_eval_levels(t, 41)) == gen.EVAL_PER_HOUR for t in range(72))
    assert gen.choose_eval_levels(5, 41) != gen.choose_eval_levels(6, 41)


def test_committed_csv_has_the_documented_columns(committed):
    assert list(committed.columns) == [
        "row_id", "split", "timestamp", "hour", "soc_kwh", "soc_pct", "cooling_load_kwh",
        "co2_factor", "prompt", *(f"q_action_{i}" for i in range(4)),
        *(f"reward_action_{i}" for i in range(4))]
    assert len(committed) == 72 * 41
    assert committed["row_id"].tolist() == [str(i) for i in range(len(committed))]


def test_committed_q_values_have_no_ties(committed):
    assert gen.find_ties(data_reward.q_matrix(committed)) == []


def test_committed_argmax_q_is_the_dp_optimal_action(committed):
    q = gen.solve_q_values(gen.make_co2_factors(), gen.make_cooling_loads(), gen.make_cops(),
                           gen.Tank())
    assert (data_reward.optimal_actions(committed) == q.reshape(-1, 4).argmax(axis=1)).all()


def test_committed_rewards_rank_actions_like_q(committed):
    assert (data_reward.reward_matrix(committed).argmax(axis=1)
            == data_reward.optimal_actions(committed)).all()


def test_every_action_is_optimal_somewhere_in_both_splits(committed):
    best = data_reward.optimal_actions(committed)
    for split in ("train", "eval"):
        in_split = (committed["split"] == split).to_numpy()
        assert set(best[in_split].tolist()) == {0, 1, 2, 3}


def test_about_a_fifth_of_the_rows_are_held_out_covering_every_hour(committed):
    held_out = committed[committed["split"] == "eval"]
    assert len(held_out) / len(committed) == pytest.approx(0.2, abs=0.01)
    assert held_out.groupby("timestamp").size().eq(gen.EVAL_PER_HOUR).all()
    assert held_out["timestamp"].nunique() == 72
    assert set(committed["split"]) == {"train", "eval"}


def test_prompts_are_short_plain_text_ending_with_the_actions(committed):
    prompts = committed["prompt"]
    assert prompts.str.len().max() < 450
    assert not prompts.str.contains("<|", regex=False).any()
    assert prompts.str.endswith(gen.ACTIONS_TEXT).all()


def test_a_prompt_reads_the_numbers_in_words():
    prompt = gen.render_prompt(gen.START.replace(hour=14), 58, 0.255, np.array([0.3, 0.5, 0.6]),
                               350, 1000, 400)
    assert prompt.startswith("Monday 5 May 2025, 14:00; 58 h left in the plan.")
    assert "CO2 now is low compared with the coming hours." in prompt
    assert "Tank: 350 of 1000 kWh (35%), half full." in prompt
    assert "Cooling load this hour: 400 kWh, large." in prompt


def test_generating_twice_gives_identical_bytes(tmp_path):
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    gen.main(["--out", str(first)])
    gen.main(["--out", str(second)])
    assert first.read_bytes() == second.read_bytes()


def test_committed_csv_equals_a_fresh_regeneration(tmp_path):
    assert generate(tmp_path) == COMMITTED.read_bytes(), (
        "the committed CSV is stale; regenerate it with the command in data/README.md")
