"""Generate the TES control data set: exact Q-values of a small cold-storage model over 5-7 May.

    python data/make_tes_dataset.py && \
        python calculate_reward.py data/dynamic_co2_factor_hourly_3day_0505_to_0507_q_dataset.csv --tau 0.05

Reads nothing. Writes data/dynamic_co2_factor_hourly_3day_0505_to_0507_q_dataset.csv (replacing it,
via a temp file) without reward columns; calculate_reward.py then adds reward_action_0..3. The
output is byte-identical on every run: there is no randomness, and the eval split comes from a hash.

The model (data/README.md has the reasoning behind every number):
- A chilled-water tank of TANK_CAPACITY_KWH thermal, its state of charge on a TANK_STEP_KWH grid.
- An office building's cooling load per hour, multiples of LOAD_STEP_KWH: low at night, afternoon peak.
- A chiller plant whose COP is better in the cool night than in the warm afternoon.
- A synthetic hourly grid CO2 factor (kg-CO2/kWh) shaped like a spring day on a grid with a large
  solar share: about 0.25 around noon, about 0.55-0.58 in the evening peak, 0.50 at night.
- Each hour one of four actions; the chiller always covers whatever load the tank does not:
    [0] idle       the chiller meets the load; the tank is untouched
    [1] charge     the chiller also makes CHARGE_KWH / CHARGE_EFFICIENCY of cold, CHARGE_KWH of which
                   reaches the tank (clipped at full)
    [2] discharge  the tank covers min(DISCHARGE_KWH, load, content)
    [3] half       the tank covers half of what [2] would, rounded down to the tank grid
  Charging and both discharges run the tank pump for the hour even when the tank cannot take or
  give anything, so a clipped action costs strictly more than idle.
- CO2 of an hour = CO2 factor x (chiller cold / COP + pump electricity).
- Q by backward dynamic programming over the 72 hours, minimising total CO2:
    Q(t, s, a) = -CO2(t, s, a) + V(t+1, s'),  V(t, s) = max_a Q(t, s, a),  V(72, s) = 0
  V(72, s) = 0: cold left in the tank after 7 May 23:00 is worth nothing, so near the end charging
  stops paying and the optimal policy empties the tank. Q is stored in units of Q_SCALE_KG kg-CO2:
  q_action_a = -(kg-CO2 from hour t to the end of 7 May under a, then optimal) / Q_SCALE_KG.
"""
import argparse
import hashlib
import math
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

# the script lives in data/ but shares the data contract with the top-level modules
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data_reward  # noqa: E402
import output_files  # noqa: E402

# ------------------------------------------------------------------------------------------------
# Horizon
START = datetime(2025, 5, 5, 0, 0)  # first hour: Monday 5 May 2025, 00:00 local time
HOURS = 72  # three days, 5-7 May
OUTPUT_NAME = "dynamic_co2_factor_hourly_3day_0505_to_0507_q_dataset.csv"  # written next to this script
# Tank and plant
TANK_CAPACITY_KWH = 1000  # thermal capacity of the chilled-water tank
TANK_STEP_KWH = 25  # state grid: 0, 25, ..., 1000 kWh = 41 levels; every flow below is a multiple
CHARGE_KWH = 150  # cold that reaches the tank in one hour of charging
CHARGE_EFFICIENCY = 0.9  # 10 % of the cold made for the tank is lost to mixing and heat gain
DISCHARGE_KWH = 200  # most cold the tank can give in one hour
PUMP_FULL_KWH = 3.0  # tank-loop pump electricity per hour at full flow (charge, discharge)
PUMP_HALF_KWH = 3.0 / 8  # at half flow; pump power scales with speed cubed (affinity laws)
COP_MEAN = 4.5  # chiller plant COP (cold out / electricity in), daily mean
COP_SWING = 0.7  # +- around the mean: 5.2 at 04:00 (cool condenser air), 3.8 at 16:00
COP_BEST_HOUR = 4  # coolest hour of the day
# Cooling load of an office building (kWh thermal per hour)
LOAD_STEP_KWH = 50  # loads are multiples of this, so half a discharge stays on the tank grid
LOAD_BASE_KWH = 50  # night and weekend base load (server rooms, ventilation)
LOAD_PEAK_KWH = 350  # added at the afternoon peak on a day with scale 1.0
LOAD_START_HOUR = 7  # occupied hours 07:00-19:59
LOAD_END_HOUR = 20  # first unoccupied hour
LOAD_SKEW = 1.3  # shape sin(pi x^1.3), x = fraction of the occupied hours: peak near 14:30
LOAD_DAY_SCALE = (1.0, 0.85, 1.1)  # 5 May typical, 6 May cooler and cloudier, 7 May warm
# Grid CO2 factor (kg-CO2/kWh), synthetic; anchors in data/README.md
CO2_BASE = 0.50  # night-time factor with little solar (fossil-heavy mix)
CO2_SOLAR_DIP = 0.26  # subtracted at the solar noon on a clear day: about 0.24 at 12:30
CO2_SUNRISE_HOUR = 5.5  # solar output from 05:30 ...
CO2_SUNSET_HOUR = 19.5  # ... to 19:30 (early May, mid latitude), sine-shaped in between
CO2_EVENING_BUMP = 0.07  # added at the evening demand peak when solar has gone (peaking plants)
CO2_EVENING_HOUR = 19.5  # centre of the evening peak
CO2_EVENING_WIDTH_H = 1.5  # its width (Gaussian sigma, hours)
CO2_NIGHT_DIP = 0.03  # subtracted around 03:00, when demand is lowest
CO2_DAY_SOLAR = (1.0, 0.75, 0.95)  # solar share per day: 6 May cloudier
CO2_DAY_OFFSET = (0.0, 0.01, -0.005)  # small day-to-day shift of the whole curve
CO2_DECIMALS = 3  # the factor is rounded to this before the DP, as printed in the CSV and prompt
# Q-values and split
Q_SCALE_KG = 20.0  # one unit of Q is 20 kg-CO2: with tau = 0.05 the rewards come out graded
Q_DECIMALS = 6  # stored precision of Q (1e-6 units = 0.02 g)
EVAL_PER_HOUR = 8  # held-out tank levels per hour: 8 of 41 = 19.5 %, every hour represented
SPLIT_SALT = "tes-eval-v1"  # changing this draws a different (still deterministic) eval split
TAU = 0.05  # default Boltzmann temperature, only for the summary printed here
# Prompt wording
LOOKAHEAD_HOURS = 12  # the prompt summarises the CO2 factor of this many coming hours
CO2_BAND = 0.03  # now differs from the coming mean by at least this: "low" / "high"
TANK_LOW_PCT = 30  # <= this (and not empty): "low"
TANK_HIGH_PCT = 70  # >= this (and not full): "high"; in between "half full"
LOAD_SMALL_KWH = 100  # <= this: "small"
LOAD_LARGE_KWH = 300  # >= this: "large"; in between "moderate"
ACTION_NAMES = ("idle", "charge", "discharge", "half discharge")  # for the printed summary
ACTIONS_TEXT = ("Actions: [0] idle, [1] charge the tank, [2] discharge the tank, "
                "[3] discharge at half rate.")  # closes every prompt
# ------------------------------------------------------------------------------------------------

IDLE, CHARGE, DISCHARGE, HALF_DISCHARGE = range(4)
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")  # fixed English names: %A/%B follow the locale


@dataclass(frozen=True)
class Tank:
    """Tank and pump parameters; kWh values are integers on the step grid so the DP is exact."""
    capacity_kwh: int = TANK_CAPACITY_KWH
    step_kwh: int = TANK_STEP_KWH
    charge_kwh: int = CHARGE_KWH
    charge_efficiency: float = CHARGE_EFFICIENCY
    discharge_kwh: int = DISCHARGE_KWH
    pump_full_kwh: float = PUMP_FULL_KWH
    pump_half_kwh: float = PUMP_HALF_KWH


def make_co2_factors(hours=HOURS):
    """Return the hourly grid CO2 factor (kg-CO2/kWh), rounded to CO2_DECIMALS."""
    factors = []
    for t in range(hours):
        day, hour = divmod(t, 24)
        daylight = (hour - CO2_SUNRISE_HOUR) / (CO2_SUNSET_HOUR - CO2_SUNRISE_HOUR)
        solar = math.sin(math.pi * daylight) if 0 < daylight < 1 else 0.0
        evening = math.exp(-0.5 * ((hour - CO2_EVENING_HOUR) / CO2_EVENING_WIDTH_H) ** 2)
        night = math.exp(-0.5 * ((hour - 3) / 2.0) ** 2)
        factor = (CO2_BASE + CO2_DAY_OFFSET[day] - CO2_SOLAR_DIP * CO2_DAY_SOLAR[day] * solar
                  + CO2_EVENING_BUMP * evening - CO2_NIGHT_DIP * night)
        factors.append(round(factor, CO2_DECIMALS))
    return np.array(factors)


def make_cooling_loads(hours=HOURS):
    """Return the hourly cooling load (kWh thermal), integer multiples of LOAD_STEP_KWH."""
    loads = []
    for t in range(hours):
        day, hour = divmod(t, 24)
        occupied = (hour - LOAD_START_HOUR) / (LOAD_END_HOUR - LOAD_START_HOUR)
        shape = math.sin(math.pi * occupied ** LOAD_SKEW) if 0 <= occupied < 1 else 0.0
        load = LOAD_BASE_KWH + LOAD_PEAK_KWH * LOAD_DAY_SCALE[day] * shape
        loads.append(LOAD_STEP_KWH * round(load / LOAD_STEP_KWH))
    return np.array(loads, dtype=np.int64)


def make_cops(hours=HOURS):
    """Return the chiller plant COP per hour, rounded to 2 decimals."""
    return np.array([round(COP_MEAN + COP_SWING * math.cos(2 * math.pi * (t % 24 - COP_BEST_HOUR)
                                                           / 24), 2) for t in range(hours)])


def step_tank(level_kwh, load_kwh, action, tank):
    """Return (next level kWh, chiller cold kWh, pump electricity kWh) for one hour of action."""
    if action == IDLE:
        return level_kwh, load_kwh, 0.0
    if action == CHARGE:
        stored = min(tank.charge_kwh, tank.capacity_kwh - level_kwh)
        return level_kwh + stored, load_kwh + stored / tank.charge_efficiency, tank.pump_full_kwh
    full = min(tank.discharge_kwh, load_kwh, level_kwh)
    if action == DISCHARGE:
        return level_kwh - full, load_kwh - full, tank.pump_full_kwh
    if action == HALF_DISCHARGE:
        # half of a full discharge, rounded down so the next level stays on the grid
        given = tank.step_kwh * (full // (2 * tank.step_kwh))
        return level_kwh - given, load_kwh - given, tank.pump_half_kwh
    raise ValueError(f"action must be 0..3, got {action!r}")


def solve_q_values(co2_factors, loads_kwh, cops, tank):
    """Return Q[t, level, action] = -(kg-CO2 from hour t to the horizon's end), exactly.

    Backward DP with V(T, s) = 0: Q(t, s, a) = -co2(t) * (cold/cop(t) + pump) + V(t+1, s').
    Levels are 0, step, ..., capacity (indices 0..capacity/step).
    """
    hours = len(co2_factors)
    n_levels = tank.capacity_kwh // tank.step_kwh + 1
    q = np.zeros((hours, n_levels, 4))
    value_next = np.zeros(n_levels)
    for t in reversed(range(hours)):
        for level in range(n_levels):
            for action in range(4):
                after, cold, pump = step_tank(level * tank.step_kwh, int(loads_kwh[t]), action, tank)
                electricity = cold / cops[t] + pump
                q[t, level, action] = (-co2_factors[t] * electricity
                                       + value_next[after // tank.step_kwh])
        value_next = q[t].max(axis=1)
    return q


def find_ties(q):
    """Return the indices of the rows of q (rows, actions) where two actions have equal Q."""
    return np.flatnonzero((np.diff(np.sort(q, axis=1), axis=1) == 0).any(axis=1)).tolist()


def choose_eval_levels(t, n_levels):
    """Return the EVAL_PER_HOUR tank levels of hour t held out for evaluation.

    Levels are ranked by SHA-256 of (salt, t, level): deterministic on every machine and numpy
    version, and stratified: every hour gives exactly EVAL_PER_HOUR rows.
    """
    def rank(level):
        return hashlib.sha256(f"{SPLIT_SALT}:{t}:{level}".encode()).hexdigest()
    return set(sorted(range(n_levels), key=rank)[:EVAL_PER_HOUR])


def describe_co2(now, ahead):
    """Return the plain reading of the CO2 factor now against the coming hours."""
    if len(ahead) == 0:
        return "No later hours are left to compare with."
    difference = now - float(np.mean(ahead))
    if difference <= -CO2_BAND:
        return "CO2 now is low compared with the coming hours."
    if difference >= CO2_BAND:
        return "CO2 now is high compared with the coming hours."
    return "CO2 now is about the same as in the coming hours."


def describe_tank(level_kwh, capacity_kwh):
    """Return empty / low / half full / high / full."""
    percent = 100 * level_kwh / capacity_kwh
    if level_kwh == 0:
        return "empty"
    if level_kwh == capacity_kwh:
        return "full"
    if percent <= TANK_LOW_PCT:
        return "low"
    if percent >= TANK_HIGH_PCT:
        return "high"
    return "half full"


def describe_load(load_kwh):
    """Return small / moderate / large."""
    if load_kwh <= LOAD_SMALL_KWH:
        return "small"
    if load_kwh >= LOAD_LARGE_KWH:
        return "large"
    return "moderate"


def render_prompt(when, hours_left, co2_now, co2_ahead, level_kwh, capacity_kwh, load_kwh):
    """Return the situation in plain English: numbers first, then a reading of them in words."""
    date = f"{WEEKDAYS[when.weekday()]} {when.day} {MONTHS[when.month - 1]} {when.year}"
    plan = "the last hour of the plan" if hours_left == 1 else f"{hours_left} h left in the plan"
    if len(co2_ahead):
        ahead = (f"; next {len(co2_ahead)} h: mean {np.mean(co2_ahead):.3f}, "
                 f"min {np.min(co2_ahead):.3f}, max {np.max(co2_ahead):.3f}")
    else:
        ahead = ""
    percent = 100 * level_kwh / capacity_kwh
    return (f"{date}, {when:%H:%M}; {plan}. Grid CO2 factor now {co2_now:.3f} kg/kWh{ahead}. "
            f"{describe_co2(co2_now, co2_ahead)} Tank: {level_kwh} of {capacity_kwh} kWh "
            f"({percent:g}%), {describe_tank(level_kwh, capacity_kwh)}. Cooling load this hour: "
            f"{load_kwh} kWh, {describe_load(load_kwh)}. {ACTIONS_TEXT}")


def build_table(co2_factors, loads_kwh, q, tank):
    """Return the data set, every value already formatted as the text the CSV will hold."""
    hours, n_levels, n_actions = q.shape
    rows = []
    for t in range(hours):
        when = START + timedelta(hours=t)
        eval_levels = choose_eval_levels(t, n_levels)
        ahead = co2_factors[t + 1:t + 1 + LOOKAHEAD_HOURS]
        for level in range(n_levels):
            level_kwh = level * tank.step_kwh
            row = {
                "row_id": str(len(rows)),
                "split": "eval" if level in eval_levels else "train",
                "timestamp": f"{when:%Y-%m-%d %H:%M}",
                "hour": str(when.hour),
                "soc_kwh": str(level_kwh),
                "soc_pct": f"{100 * level_kwh / tank.capacity_kwh:.1f}",
                "cooling_load_kwh": str(int(loads_kwh[t])),
                "co2_factor": f"{co2_factors[t]:.{CO2_DECIMALS}f}",
                "prompt": render_prompt(when, hours - t, co2_factors[t], ahead, level_kwh,
                                        tank.capacity_kwh, int(loads_kwh[t])),
            }
            for action in range(n_actions):
                row[f"q_action_{action}"] = f"{q[t, level, action] / Q_SCALE_KG:.{Q_DECIMALS}f}"
            rows.append(row)
    return pd.DataFrame(rows, dtype=str)


def summarise(table):
    """Return printable lines: optimal-action frequencies and the reward spread at TAU."""
    q = data_reward.q_matrix(table)
    best = np.argmax(q, axis=1)
    rewards = data_reward.boltzmann_rewards(q, TAU)
    lines = [f"{len(table)} rows, {len(set(table['timestamp']))} hours, Q in units of "
             f"{Q_SCALE_KG:g} kg-CO2 (negative CO2 to the end of 7 May)"]
    for name, mask in (("all", np.ones(len(table), bool)),
                       ("train", (table["split"] == "train").to_numpy()),
                       ("eval", (table["split"] == "eval").to_numpy())):
        counts = np.bincount(best[mask], minlength=q.shape[1])
        shares = ", ".join(f"[{a}] {ACTION_NAMES[a]} {counts[a]} ({100 * counts[a] / mask.sum():.1f}%)"
                           for a in range(q.shape[1]))
        chosen = rewards[mask, :][np.arange(mask.sum()), best[mask]]
        p10, p25, p50, p75, p90 = np.percentile(chosen, [10, 25, 50, 75, 90])
        lines += [f"{name:5s} {mask.sum():5d} rows, optimal action: {shares}",
                  f"      optimal action's reward at tau={TAU:g}: p10 {p10:.3f} p25 {p25:.3f} "
                  f"median {p50:.3f} p75 {p75:.3f} p90 {p90:.3f}",
                  f"      mean reward: uniform guess {rewards[mask].mean():.3f}, best constant "
                  f"action {rewards[mask].mean(axis=0).max():.3f} "
                  f"([{rewards[mask].mean(axis=0).argmax()}]), optimal policy {chosen.mean():.3f}"]
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / OUTPUT_NAME,
                        help="CSV to write (default: %(default)s)")
    args = parser.parse_args(argv)
    tank = Tank()
    co2_factors, loads_kwh, cops = make_co2_factors(), make_cooling_loads(), make_cops()
    q = solve_q_values(co2_factors, loads_kwh, cops, tank)
    table = build_table(co2_factors, loads_kwh, q, tank)
    # checked on the Q text as stored: rounding keeps order, so no tie there means the stored
    # argmax is the DP's optimal action and every reward ranking is strict
    ties = find_ties(data_reward.q_matrix(table))
    if ties:
        raise RuntimeError(f"rows {ties[:5]} (of {len(ties)}) have two actions with equal stored Q; "
                           "change PUMP_HALF_KWH or CHARGE_EFFICIENCY slightly or raise Q_DECIMALS")
    output_files.write_csv_atomically(table, args.out)
    print(f"wrote {args.out}")
    print("\n".join(summarise(table)))


if __name__ == "__main__":
    main()
