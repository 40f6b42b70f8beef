"""Properties of data_reward.boltzmann_rewards: softmax(Q / tau) per row, stable for any finite Q."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # so a bare `pytest` finds it
from data_reward import boltzmann_rewards

Q = np.array([[-46.61, -46.86, -46.68, -46.62],
              [0.0, 0.1, 0.2, 0.3],
              [5.0, 5.0, 4.0, -3.0]])


def test_rows_sum_to_one():
    assert np.allclose(boltzmann_rewards(Q, 0.05).sum(axis=1), 1.0, atol=1e-12)


def test_rewards_lie_between_zero_and_one():
    rewards = boltzmann_rewards(Q, 0.05)
    assert (rewards >= 0).all() and (rewards <= 1).all()


def test_argmax_is_preserved():
    assert (boltzmann_rewards(Q, 0.05).argmax(axis=1) == Q.argmax(axis=1)).all()


def test_known_values_for_two_actions():
    # exp(tau * ln 2 / tau) = 2: the second action gets twice the weight of the first
    rewards = boltzmann_rewards(np.array([[0.0, 0.05 * math.log(2)]]), 0.05)
    assert rewards[0] == pytest.approx([1 / 3, 2 / 3], abs=1e-12)


def test_adding_a_constant_to_a_row_changes_nothing():
    shifted = Q + np.array([[1e6], [-7.5], [0.0]])
    assert np.allclose(boltzmann_rewards(shifted, 0.05), boltzmann_rewards(Q, 0.05), atol=1e-9)


def test_tiny_tau_gives_one_hot_without_overflow_or_nan():
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow to 0 is fine
        rewards = boltzmann_rewards(np.array([[0.0, 1e-6, -1.0]]), 1e-12)
    assert rewards.tolist() == [[0.0, 1.0, 0.0]]


def test_tiny_tau_splits_exact_ties_evenly():
    rewards = boltzmann_rewards(np.array([[2.0, 2.0, 1.0]]), 1e-12)
    assert rewards.tolist() == [[0.5, 0.5, 0.0]]


def test_large_tau_approaches_uniform():
    assert np.allclose(boltzmann_rewards(Q, 1e9), 0.25, atol=1e-8)


def test_q_values_near_the_float_limits_stay_finite():
    q = np.array([[1e300, -1e300, 0.0, 1.7e308], [-1.7e308, 1.7e308, 0.0, 0.0]])
    rewards = boltzmann_rewards(q, 0.05)
    assert np.isfinite(rewards).all()
    assert rewards.tolist() == [[0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]]


def test_differences_of_1e_minus_300_count_as_equal():
    rewards = boltzmann_rewards(np.array([[0.0, 1e-300, -1e-300]]), 0.05)
    assert np.allclose(rewards, 1 / 3, atol=1e-15)


def test_a_single_action_gets_reward_one():
    assert boltzmann_rewards(np.array([[-3.0], [7.0]]), 0.05).tolist() == [[1.0], [1.0]]


def test_six_actions_work():
    q = np.arange(12, dtype=float).reshape(2, 6) / 100
    rewards = boltzmann_rewards(q, 0.05)
    assert rewards.shape == (2, 6) and np.allclose(rewards.sum(axis=1), 1.0)
    assert (np.diff(rewards, axis=1) > 0).all()  # higher Q, higher reward


@pytest.mark.parametrize("tau", [0, 0.0, -0.05, float("nan"), float("inf"), -float("inf")])
def test_tau_that_is_not_finite_and_positive_is_rejected_naming_the_flag(tau):
    with pytest.raises(ValueError, match="--tau"):
        boltzmann_rewards(Q, tau)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_q_is_rejected(bad):
    q = Q.copy()
    q[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        boltzmann_rewards(q, 0.05)


def test_a_one_dimensional_q_is_rejected():
    with pytest.raises(ValueError, match="2-D"):
        boltzmann_rewards(np.array([0.0, 1.0]), 0.05)
