"""Anomaly rules, each with a reason code, computed over a whole batch at once.

Rules without state (`rule_flags`) look at one sample; the sample-gap and
outlier rules need the car's history and run in `pipeline.processing.batch`.

Thresholds come from the real data (2021 and 2024 Monaco, the training races):
- FastF1 sends throttle 104 as an error value (about 6 % of 2023 samples, mostly
  in the pit lane and on the grid) and gear 64/128 on a few hundred samples;
  both are reported as impossible values, honestly, rather than hidden.
- Speed per 1000 rpm has a band per gear; outside it (with slack for the sample
  misalignment around a gear shift) the gear, speed and rpm disagree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

    import numpy as np
    import pandas as pd

    from pipeline.processing.columns import Columns

IMPOSSIBLE_SPEED = "impossible_speed"
IMPOSSIBLE_RPM = "impossible_rpm"
IMPOSSIBLE_GEAR = "impossible_gear"
IMPOSSIBLE_THROTTLE = "impossible_throttle"
IMPOSSIBLE_BRAKE = "impossible_brake"
THROTTLE_AND_BRAKE = "throttle_and_brake"
GEAR_SPEED_RPM_MISMATCH = "gear_speed_rpm_mismatch"
SAMPLE_GAP = "sample_gap"
SPEED_OUTLIER = "speed_outlier"
RPM_OUTLIER = "rpm_outlier"

REASONS = (
    IMPOSSIBLE_SPEED, IMPOSSIBLE_RPM, IMPOSSIBLE_GEAR, IMPOSSIBLE_THROTTLE, IMPOSSIBLE_BRAKE,
    THROTTLE_AND_BRAKE, GEAR_SPEED_RPM_MISMATCH, SAMPLE_GAP, SPEED_OUTLIER, RPM_OUTLIER,
)  # fmt: skip

MAX_SPEED_KMH = 400.0  # above any car's top speed (~370 km/h record)
MAX_RPM = 15_500.0  # the power unit is limited to 15,000 rpm
MAX_GEAR = 8
# km/h per 1000 rpm, per gear: the 0.1-99.9 % range on 2021+2024 Monaco, widened 20 %.
GEAR_RATIO_BAND = {
    1: (2.9, 14.6), 2: (6.8, 16.6), 3: (7.7, 20.0), 4: (9.3, 23.6),
    5: (9.8, 27.0), 6: (10.6, 30.5), 7: (11.0, 33.3), 8: (11.2, 38.2),
}  # fmt: skip
MOVING_KMH, MIN_RPM_FOR_RATIO = 30.0, 3_000.0

# Robust rolling baseline (statistical outliers): rate of change of a channel
# against the median and MAD of the car's previous BASELINE_SAMPLES rates.
# At Z 8, 0.05 % of 2023 Monaco speed samples are flagged (braking from 290 km/h
# is about -180 km/h per s, well within the baseline; a glitch to 0 is not).
BASELINE_SAMPLES = 40
OUTLIER_Z = 8.0
RATE_FLOOR = {"speed": 20.0, "rpm": 1_000.0}  # smallest MAD-based scale, per second
OUTLIER_REASON = {"speed": SPEED_OUTLIER, "rpm": RPM_OUTLIER}
# Rates from which the baselines' bounds come from running filters, each value
# read a few times; below, from gathering each baseline (scipy's calls cost more
# than a few baselines, and at 1x a batch holds one rate per car).
RUNNING_FILTERS_FROM = 512


def rule_flags(frame: pd.DataFrame | Columns) -> dict[str, np.ndarray]:
    """Reason -> boolean mask over the batch, for rules that need no history."""
    import numpy as np

    speed = np.asarray(frame["speed"])
    rpm = np.asarray(frame["rpm"])
    gear = np.asarray(frame["gear"])
    throttle = np.asarray(frame["throttle"])
    brake = np.asarray(frame["brake"])
    low = np.full(len(frame), np.nan)
    high = np.full(len(frame), np.nan)
    for g, (lo, hi) in GEAR_RATIO_BAND.items():
        low[gear == g], high[gear == g] = lo, hi
    moving = (speed > MOVING_KMH) & (rpm > MIN_RPM_FOR_RATIO) & np.isfinite(low)
    ratio = np.divide(speed * 1000.0, rpm, out=np.zeros(len(frame)), where=rpm > 0)
    return {
        IMPOSSIBLE_SPEED: (speed < 0) | (speed > MAX_SPEED_KMH),
        IMPOSSIBLE_RPM: (rpm < 0) | (rpm > MAX_RPM),
        IMPOSSIBLE_GEAR: (gear < 0) | (gear > MAX_GEAR),
        IMPOSSIBLE_THROTTLE: (throttle < 0) | (throttle > 100),
        IMPOSSIBLE_BRAKE: (brake < 0) | (brake > 100),
        THROTTLE_AND_BRAKE: (throttle >= 99) & (throttle <= 100) & (brake >= 99),
        GEAR_SPEED_RPM_MISMATCH: moving & ((ratio < low) | (ratio > high))
        | ((speed > 80) & ((gear == 0) | (rpm < 4_000))),
    }


def robust_outliers(
    histories: Sequence[Sequence[float]], rates: np.ndarray, counts: Sequence[int], floor: float
) -> np.ndarray:
    """Robust z-score test of every car's new `rates` (grouped by car, `counts`
    of each) against the BASELINE_SAMPLES rates before each: `histories` hold
    each car's latest rates from earlier batches. Rates with too little history
    are not judged (False). Every car's baselines in one flat array, so the
    work is numpy calls per batch, not per car (at 1x a batch holds one rate of
    each car)."""
    import numpy as np

    flags = np.zeros(len(rates), dtype=bool)
    held = np.array([len(history) for history in histories], dtype=np.int64)
    new = np.array(counts, dtype=np.int64)
    car = np.repeat(np.arange(len(new)), new)
    # Each rate's place in its car's history-then-rates: judged from BASELINE_SAMPLES on.
    place = held[car] + np.arange(len(rates)) - np.repeat(np.cumsum(new) - new, new)
    judged = place >= BASELINE_SAMPLES
    if not judged.any():
        return flags
    split = np.cumsum(new)[:-1].tolist()
    flat = np.concatenate(
        [part for pair in zip(histories, np.split(rates, split), strict=True) for part in pair]
    ).astype(float)
    car_at = np.cumsum(held + new) - (held + new)  # where each car's history starts in `flat`
    starts = (car_at[car] + place - BASELINE_SAMPLES)[judged]
    flags[judged] = _beyond_robust_scale(flat, starts, rates[judged], floor)
    return flags


def _beyond_robust_scale(
    flat: np.ndarray, starts: np.ndarray, rates: np.ndarray, floor: float
) -> np.ndarray:
    """Whether each rate's robust z-score against its baseline (the
    BASELINE_SAMPLES values of `flat` from its start) exceeds OUTLIER_Z:
    |rate - median| > OUTLIER_Z * max(1.4826 * MAD, floor).

    Exact, but cheap where the answer is plain (most rates): a rate within
    OUTLIER_Z * floor of every value of its baseline is within it of the median,
    so it needs no median; and one within it of the median needs no MAD. The
    medians (partitions of 40 values) were most of the anomaly step's cost, then
    the baselines' least and greatest values: now running filters over the
    flat array (each value read a few times, not once per baseline holding it),
    and only the unsure rates' baselines are gathered."""
    import numpy as np
    from scipy.ndimage import maximum_filter1d, minimum_filter1d

    margin = OUTLIER_Z * floor
    outlier = np.zeros(len(rates), dtype=bool)
    if len(rates) < RUNNING_FILTERS_FROM:  # e.g. at 1x, one rate per car: each baseline once
        gathered = flat[starts[:, None] + np.arange(BASELINE_SAMPLES)]
        least, greatest = gathered.min(axis=1), gathered.max(axis=1)
    else:
        # A filter of even width W centred on position c covers c - W/2 .. c + W/2 - 1:
        # the baseline starting at s is the window centred on s + W/2.
        centres = starts + BASELINE_SAMPLES // 2
        least = minimum_filter1d(flat, BASELINE_SAMPLES)[centres]
        greatest = maximum_filter1d(flat, BASELINE_SAMPLES)[centres]
    unsure = np.flatnonzero((rates - least > margin) | (greatest - rates > margin))
    if not len(unsure):
        return outlier
    baseline = flat[starts[unsure, None] + np.arange(BASELINE_SAMPLES)]  # partitioned below
    median = _row_medians(baseline)
    deviation = np.abs(rates[unsure] - median)
    far = np.flatnonzero(deviation > margin)
    if len(far):
        mad = _row_medians(np.abs(baseline[far] - median[far, None]))
        outlier[unsure[far]] = deviation[far] > OUTLIER_Z * np.maximum(1.4826 * mad, floor)
    return outlier


def _row_medians(rows: np.ndarray) -> np.ndarray:
    """The median of each row, as np.median gives it; partitions `rows` in place."""
    width = rows.shape[1]
    half = width // 2
    if width % 2:
        rows.partition(half, axis=1)
        middle: np.ndarray = rows[:, half]
        return middle
    rows.partition((half - 1, half), axis=1)
    mean: np.ndarray = (rows[:, half - 1] + rows[:, half]) / 2
    return mean
