"""The per-car stream logic (`pipeline.processing`), without Kafka or PostgreSQL.

Batches are built the way the consumer builds them: the schema's fields plus
`partition`, `offset` and `produced_at_us`, nullable whole numbers as Int64. The
window, state and duplicate tests use the real 2023 Monaco race (the export in
data/exports, skipped when it is absent); the rule tests use synthetic samples.
Windows are checked against an independent pandas recomputation.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pandas as pd
import pytest

from pipeline.kafka.producer import message_columns
from pipeline.processing import anomaly, batch, compose
from pipeline.processing.batch import BatchResult, PartitionState, WindowConfig
from pipeline.processing.columns import Columns, concat, running_max_before
from pipeline.schema import SAMPLE_FIELDS, SCHEMA_VERSION, TelemetrySample
from pipeline.sources.replay import load_samples

RACE_RUN = "2023_Monaco_R@test"
SYNTHETIC_RUN = "synthetic@test"
PARTITIONS = 4
WINDOW_US = 3_000_000
# 2023-05-28 12:00:00 UTC: a multiple of 3 s, so synthetic second 0 starts a window.
EPOCH_US = 1_685_275_200_000_000
# Three cars, two of them on partition 0 (16 % 4 == 44 % 4 == 0).
CARS = (1, 16, 44)
SAMPLES_PER_CAR = 2_000
UNEVEN_BATCHES = (1, 997, 13, 2_400, 5, 1_584)  # then the rest in one batch
INTEGER_COLUMNS = ("samples", "gear_changes", "window_end_us")
FLOAT_COLUMNS = (
    "speed_min", "speed_avg", "speed_max", "rpm_min", "rpm_avg", "rpm_max",
    "throttle_full_share", "brake_share", "drs_open_share",
)  # fmt: skip


# --- building consumer-like batches ---------------------------------------------------


NULLABLE_INTS = {c: "Int64" for c in ("lap_number", "stint", "position", "race_laps", "drs")}


def consumer_frame(columns: dict[str, Sequence[Any]]) -> pd.DataFrame:
    """A batch as the consumer builds it (`compose.columns_frame`, as
    `compose.frame` does from decoded messages), with partitions and offsets."""
    frame = compose.columns_frame(columns)
    frame["partition"] = (frame["driver_number"] % PARTITIONS).astype("int64")
    frame["offset"] = frame.groupby("partition").cumcount().astype("int64")
    frame["produced_at_us"] = pd.Series(frame["date_us"], dtype="Int64")
    return frame


def synthetic_car(
    times_s: Sequence[float],
    *,
    first_seq: int = 0,
    driver_number: int = 1,
    speed: float | Sequence[float] = 250.0,
    rpm: float | Sequence[float] = 11_000.0,
) -> pd.DataFrame:
    """One car's samples at `times_s` seconds after EPOCH_US, in 7th gear at full throttle."""
    speeds = np.broadcast_to(np.asarray(speed, dtype=float), len(times_s))
    rpms = np.broadcast_to(np.asarray(rpm, dtype=float), len(times_s))
    samples = [
        TelemetrySample(
            v=SCHEMA_VERSION,
            run_id=SYNTHETIC_RUN,
            session_key="synthetic",
            driver_number=driver_number,
            driver="VER",
            seq=first_seq + i,
            date_us=EPOCH_US + round(t * 1e6),
            session_time_s=float(t),
            speed=float(speeds[i]),
            rpm=float(rpms[i]),
            gear=7,
            throttle=100.0,
            brake=0.0,
            drs_open=False,
        )
        for i, t in enumerate(times_s)
    ]
    rows = zip(*(msgspec.structs.astuple(s) for s in samples), strict=True)
    return consumer_frame(dict(zip(SAMPLE_FIELDS, rows, strict=True)))


def new_states() -> dict[int, PartitionState]:
    return {p: PartitionState() for p in range(PARTITIONS)}


def cut(frame: pd.DataFrame, at: Iterable[int]) -> list[pd.DataFrame]:
    """`frame` cut into batches before each row position in `at`."""
    bounds = np.unique([0, *(i for i in at if 0 < i < len(frame)), len(frame)])
    return [frame.iloc[lo:hi] for lo, hi in itertools.pairwise(bounds)]


def gear_changes_within_windows(frame: pd.DataFrame) -> np.ndarray:
    """Row positions where a car's gear differs from its previous sample's, same window."""
    car = frame["driver_number"]
    window = frame["date_us"] // WINDOW_US
    changed = frame["gear"].ne(frame.groupby(car)["gear"].shift()) & window.eq(
        window.groupby(car).shift()
    )
    return np.flatnonzero(changed.to_numpy())


def uneven_batches(frame: pd.DataFrame) -> list[pd.DataFrame]:
    """Batches of UNEVEN_BATCHES sizes, with a few gear changes alone in one-row
    batches: their windows span three batches, the change between two of them."""
    changes = gear_changes_within_windows(frame)
    isolated = changes[:: max(len(changes) // 8, 1)]
    return cut(frame, [*np.cumsum(UNEVEN_BATCHES), *isolated, *(isolated + 1)])


def windows_straddling(batches: Sequence[pd.DataFrame]) -> int:
    """How many (car, window) pairs have samples on both sides of a batch boundary."""
    count = 0
    for before, after in itertools.pairwise(batches):
        last = before.groupby("driver_number")["date_us"].max() // WINDOW_US
        first = after.groupby("driver_number")["date_us"].min() // WINDOW_US
        count += int((last == first.reindex(last.index)).sum())
    return count


def run_batches(
    batches: Sequence[pd.DataFrame],
    states: dict[int, PartitionState],
    config: WindowConfig | None = None,
) -> list[BatchResult]:
    return [batch.process(b, states, config or WindowConfig()) for b in batches]


def end_run(states: dict[int, PartitionState], run_id: str) -> Columns:
    """What the end markers of `run_id`, one per partition, close."""
    return concat([batch.end_run(s, run_id, WindowConfig()) for s in states.values()])


def all_windows(results: Sequence[BatchResult], closed_at_end: Columns) -> pd.DataFrame:
    rows = concat([*(r.windows for r in results), closed_at_end]).to_pandas()
    return rows.sort_values(["driver_number", "window_start_us"]).reset_index(drop=True)


def kept_samples(results: Sequence[BatchResult]) -> pd.DataFrame:
    samples = pd.concat([r.samples for r in results], ignore_index=True)
    return samples.sort_values(["driver_number", "seq"]).reset_index(drop=True)


# --- the independent recomputation ----------------------------------------------------


def expected_windows(frame: pd.DataFrame) -> pd.DataFrame:
    """Each car's 3 s windows, computed from scratch over all its samples."""
    cars = frame.sort_values(["driver_number", "seq"]).reset_index(drop=True)
    start = cars["date_us"] // WINDOW_US * WINDOW_US
    same_car_and_window = cars["driver_number"].eq(cars["driver_number"].shift()) & start.eq(
        start.shift()
    )
    cars = cars.assign(
        window_start_us=start,
        gear_changed=same_car_and_window & cars["gear"].ne(cars["gear"].shift()),
        throttle_full=cars["throttle"].between(99, 100),
        brake_on=cars["brake"] >= 50,
    )
    windows = cars.groupby(["driver_number", "window_start_us"]).agg(
        samples=("speed", "size"),
        speed_min=("speed", "min"), speed_avg=("speed", "mean"), speed_max=("speed", "max"),
        rpm_min=("rpm", "min"), rpm_avg=("rpm", "mean"), rpm_max=("rpm", "max"),
        throttle_full_share=("throttle_full", "mean"), brake_share=("brake_on", "mean"),
        drs_open_share=("drs_open", "mean"), gear_changes=("gear_changed", "sum"),
    )  # fmt: skip
    windows["window_end_us"] = windows.index.get_level_values("window_start_us") + WINDOW_US
    return windows.reset_index()


def assert_same_windows(actual: pd.DataFrame, expected: pd.DataFrame) -> None:
    keys = ["driver_number", "window_start_us"]
    assert not actual.duplicated(keys).any(), "a window was written twice"
    assert actual[keys].to_numpy().tolist() == expected[keys].to_numpy().tolist()
    for column in INTEGER_COLUMNS:
        assert actual[column].tolist() == expected[column].tolist(), column
    for column in FLOAT_COLUMNS:
        close = np.isclose(actual[column].to_numpy(float), expected[column].to_numpy(float))
        assert close.all(), f"{column}: {actual.loc[~close, [*keys, column]]}"


def reasons_by_sample(samples: pd.DataFrame) -> list[tuple[int, int, list[str]]]:
    return [
        (int(d), int(s), list(a or []))
        for d, s, a in zip(
            samples["driver_number"], samples["seq"], samples["anomalies"], strict=True
        )
    ]


# --- real data ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def race(race_export: Path) -> pd.DataFrame:
    """The whole 2023 Monaco race as one consumer-like frame, in replay order."""
    samples = load_samples(race_export)
    samples["seq"] = samples.groupby("driver_number").cumcount()
    return consumer_frame(message_columns(samples, RACE_RUN, race_export.name))


@pytest.fixture(scope="module")
def three_cars(race: pd.DataFrame) -> pd.DataFrame:
    """The first SAMPLES_PER_CAR samples of three cars, interleaved as replayed."""
    chosen = race["driver_number"].isin(CARS) & (race["seq"] < SAMPLES_PER_CAR)
    return race[chosen].reset_index(drop=True)


def test_batch_frames_have_the_consumer_dtypes(race: pd.DataFrame) -> None:
    # The consumer's frame of decoded messages (compose.frame) has the dtypes
    # pandas itself infers from the decoded values, None values included.
    rows = race.iloc[::997]
    columns = {
        name: rows[name].astype(object).where(rows[name].notna(), None).tolist()
        for name in SAMPLE_FIELDS
    }
    assert rows[["lap_number", "compound"]].isna().any().all(), "no None values to check"
    structs = [TelemetrySample(*values) for values in zip(*columns.values(), strict=True)]
    inferred = pd.DataFrame(columns).astype(NULLABLE_INTS)
    built = compose.frame(compose.Decoded.of(structs))
    pd.testing.assert_frame_equal(built[list(SAMPLE_FIELDS)], inferred)


def test_windows_across_uneven_batches_match_a_recomputation(three_cars: pd.DataFrame) -> None:
    batches = uneven_batches(three_cars)
    assert windows_straddling(batches) > 0, "no window spans a batch boundary: a weak test"
    states = new_states()
    results = run_batches(batches, states)
    closed_at_end = end_run(states, RACE_RUN)
    assert closed_at_end, "the last windows stay open until the end marker"
    assert not any(s.cars for s in states.values())
    assert_same_windows(all_windows(results, closed_at_end), expected_windows(three_cars))


def test_one_batch_or_many_give_the_same_windows_and_anomalies(
    three_cars: pd.DataFrame,
) -> None:
    states = new_states()
    whole = run_batches([three_cars], states)
    whole_windows = all_windows(whole, end_run(states, RACE_RUN))
    states = new_states()
    pieces = run_batches(uneven_batches(three_cars), states)
    pieces_windows = all_windows(pieces, end_run(states, RACE_RUN))
    assert_same_windows(pieces_windows, whole_windows)
    # The rolling baseline crosses batches too: the same samples are flagged.
    assert reasons_by_sample(kept_samples(pieces)) == reasons_by_sample(kept_samples(whole))


def test_state_survives_encode_and_decode(three_cars: pd.DataFrame) -> None:
    batches = uneven_batches(three_cars)
    first, rest = batches[:3], batches[3:]

    states = new_states()
    straight = run_batches(first, states) + run_batches(rest, states)
    straight_windows = all_windows(straight, end_run(states, RACE_RUN))

    states = new_states()
    before = run_batches(first, states)
    assert any(car.open_windows and car.rates for s in states.values() for car in s.cars.values())
    states = {p: PartitionState.decode(s.encode()) for p, s in states.items()}
    after = run_batches(rest, states)
    restored_windows = all_windows(before + after, end_run(states, RACE_RUN))

    pd.testing.assert_frame_equal(restored_windows, straight_windows)
    assert reasons_by_sample(kept_samples(before + after)) == reasons_by_sample(
        kept_samples(straight)
    )


def test_empty_state_decodes_to_a_fresh_one() -> None:
    assert PartitionState.decode(None) == PartitionState()
    assert PartitionState.decode(b"") == PartitionState()


def test_resent_samples_are_counted_as_duplicates_and_dropped(three_cars: pd.DataFrame) -> None:
    half = len(three_cars) // 2
    seen, unseen = three_cars.iloc[:half], three_cars.iloc[half:]
    resent = seen.iloc[-700:-100]  # already processed: a producer retry or a replay
    states = new_states()
    first = run_batches([seen], states)
    # The resends arrive in the middle of the next batch, between fresh samples.
    mixed = pd.concat([unseen.iloc[:50], resent, unseen.iloc[50:]], ignore_index=True)
    second = run_batches([mixed], states)

    assert second[0].duplicates == len(resent)
    kept = second[0].samples
    assert len(kept) == len(unseen)
    resent_keys = set(zip(resent["driver_number"], resent["seq"], strict=True))
    kept_keys = set(zip(kept["driver_number"], kept["seq"], strict=True))
    assert not resent_keys & kept_keys
    duplicated_events = second[0].anomalies.merge(resent[["driver_number", "seq"]])
    assert duplicated_events.empty, "resent samples must not be logged as anomalies again"
    # And they were not folded into any window a second time.
    windows = all_windows(first + second, end_run(states, RACE_RUN))
    assert_same_windows(windows, expected_windows(three_cars))


def test_samples_of_an_ended_run_are_refused_as_duplicates(three_cars: pd.DataFrame) -> None:
    states = new_states()
    run_batches([three_cars], states)
    end_run(states, RACE_RUN)
    [replayed] = run_batches([three_cars.iloc[-300:]], states)
    assert replayed.duplicates == 300
    assert replayed.samples.empty and not replayed.windows


def test_late_sample_is_flagged_and_not_folded_into_a_window() -> None:
    config = WindowConfig(window_s=3.0, allowed_lateness_s=2.0)
    states = new_states()
    on_time = synthetic_car(np.arange(41) * 0.25, speed=250.0)  # 0 s .. 10 s
    [first] = run_batches([on_time], states, config)
    # Watermark 10 - 2 = 8 s: windows [0, 3) and [3, 6) are closed and written.
    assert (first.windows["window_start_us"] - EPOCH_US).tolist() == [0, 3_000_000]

    late = synthetic_car([1.0], first_seq=41, speed=100.0)  # its window [0, 3) is closed
    [second] = run_batches([late], states, config)
    assert second.late == 1
    assert second.samples["is_late"].tolist() == [True]
    assert not second.windows

    within_lateness = synthetic_car([7.0], first_seq=42, speed=100.0)  # [6, 9) is open
    [third] = run_batches([within_lateness], states, config)
    assert third.late == 0
    assert third.samples["is_late"].tolist() == [False]

    windows = all_windows([first, second, third], end_run(states, SYNTHETIC_RUN))
    by_start = windows.set_index(windows["window_start_us"] - EPOCH_US)
    assert by_start.index.is_unique
    assert by_start.loc[0, "samples"] == 12 and by_start.loc[0, "speed_min"] == 250.0
    assert by_start.loc[6_000_000, "samples"] == 13  # 6 .. 8.75 s and the 7 s one
    assert by_start.loc[6_000_000, "speed_min"] == 100.0
    assert windows["samples"].sum() == len(on_time) + 1  # the late one is in none


def test_a_late_sample_does_not_make_the_next_one_look_like_a_gap() -> None:
    config = WindowConfig(window_s=3.0, allowed_lateness_s=2.0)
    states = new_states()
    run_batches([synthetic_car(np.arange(41) * 0.25, speed=250.0)], states, config)  # 0..10 s
    late_then_on_time = synthetic_car([1.0, 10.25, 10.5], first_seq=41, speed=250.0)
    [result] = run_batches([late_then_on_time], states, config)
    assert result.samples["is_late"].tolist() == [True, False, False]
    assert all(not reasons for reasons in result.samples["anomalies"].iloc[1:])
    assert anomaly.SAMPLE_GAP not in set(result.anomalies["reason"])


def test_anomaly_rules_on_single_samples() -> None:
    cases = {
        # name: (speed, rpm, gear, throttle, brake), expected reasons
        "impossible speed": ((450.0, 12_500.0, 8, 100.0, 0.0), {anomaly.IMPOSSIBLE_SPEED}),
        "impossible throttle": ((200.0, 11_000.0, 7, 104.0, 0.0), {anomaly.IMPOSSIBLE_THROTTLE}),
        "impossible gear": ((200.0, 11_000.0, 128, 100.0, 0.0), {anomaly.IMPOSSIBLE_GEAR}),
        "throttle and brake": ((200.0, 11_000.0, 7, 100.0, 100.0), {anomaly.THROTTLE_AND_BRAKE}),
        "low rpm in 8th": ((200.0, 2_000.0, 8, 100.0, 0.0), {anomaly.GEAR_SPEED_RPM_MISMATCH}),
        "too fast for 1st": ((200.0, 11_000.0, 1, 100.0, 0.0), {anomaly.GEAR_SPEED_RPM_MISMATCH}),
        "normal": ((200.0, 11_000.0, 7, 100.0, 0.0), set()),
    }
    frame = pd.DataFrame(
        [row for row, _ in cases.values()], columns=["speed", "rpm", "gear", "throttle", "brake"]
    )
    flags = anomaly.rule_flags(frame)
    for i, (name, (_, expected)) in enumerate(cases.items()):
        flagged = {reason for reason, mask in flags.items() if mask[i]}
        assert flagged == expected, name


@pytest.mark.parametrize("split_at", [None, 3], ids=["one batch", "gap between batches"])
def test_sample_gap_is_reported_with_its_length(split_at: int | None) -> None:
    times = [0.0, 0.25, 0.5, 3.0, 3.25]
    car = synthetic_car(times)
    results = run_batches(cut(car, [] if split_at is None else [split_at]), new_states())
    samples = kept_samples(results)
    has_gap = [anomaly.SAMPLE_GAP in (reasons or []) for reasons in samples["anomalies"]]
    assert has_gap == [False, False, False, True, False]
    events = pd.concat([r.anomalies for r in results], ignore_index=True)
    gaps = events[events["reason"] == anomaly.SAMPLE_GAP]
    assert gaps["seq"].tolist() == [3]
    assert gaps["value"].tolist() == [2.5]


@pytest.mark.parametrize("split_at", [None, 60], ids=["one batch", "glitch in the next batch"])
def test_speed_glitch_after_a_steady_baseline_is_an_outlier(split_at: int | None) -> None:
    rng = np.random.default_rng(7)
    steady = 250.0 + rng.normal(0.0, 1.5, 60)
    speed = [*steady, 0.0]  # a glitch to 0 km/h, 0.24 s after 250 km/h
    rpm = 11_000.0 + rng.normal(0.0, 50.0, 61)
    car = synthetic_car(np.arange(61) * 0.24, speed=speed, rpm=rpm)
    results = run_batches(cut(car, [] if split_at is None else [split_at]), new_states())
    reasons = kept_samples(results)["anomalies"].tolist()
    assert reasons[-1] == [anomaly.SPEED_OUTLIER]
    assert all(r is None for r in reasons[:-1]), "the steady samples raise no alarm"
    events = pd.concat([r.anomalies for r in results], ignore_index=True)
    assert events[events["reason"] == anomaly.SPEED_OUTLIER]["seq"].tolist() == [60]


def test_whole_2023_monaco_race_in_batches(race: pd.DataFrame) -> None:
    states = new_states()
    results = run_batches(cut(race, range(5_000, len(race), 5_000)), states)
    closed_at_end = end_run(states, RACE_RUN)
    assert sum(r.duplicates for r in results) == 0
    assert sum(r.late for r in results) == 0
    samples = pd.concat([r.samples for r in results], ignore_index=True)
    assert len(samples) == len(race)
    assert not samples["is_late"].any()
    outliers = samples["anomalies"].map(lambda r: anomaly.SPEED_OUTLIER in (r or [])).sum()
    assert 0 < outliers / len(samples) < 0.002
    windows = all_windows(results, closed_at_end)
    assert windows["samples"].sum() == len(race)
    assert not windows.duplicated(["driver_number", "window_start_us"]).any()


# --- inputs that must not break a car's stream ----------------------------------------


def test_a_sample_dated_far_ahead_is_refused_and_the_car_stays_on_time() -> None:
    config = WindowConfig(max_event_time_ahead_s=3_600)
    states = new_states()
    run_batches([synthetic_car(np.arange(41) * 0.25)], states, config)  # 0 .. 10 s
    wild = synthetic_car([10.25, 86_400 * 365, 10.5], first_seq=41)  # one a year ahead
    [result] = run_batches([wild], states, config)
    assert [(p, o) for p, o, _ in result.rejected] == [(1, 1)]  # car 1: partition 1
    assert "ahead of car synthetic@test:1's clock" in result.rejected[0][2]
    assert result.samples["seq"].tolist() == [41, 43]  # stored, neither late nor duplicate
    assert result.late == 0 and result.duplicates == 0
    [after] = run_batches([synthetic_car([10.75, 11.0], first_seq=44)], states, config)
    assert after.late == 0 and not after.rejected


def test_a_huge_seq_is_refused_and_the_rest_are_not_duplicates() -> None:
    config = WindowConfig(max_seq_ahead=100_000)
    states = new_states()
    run_batches([synthetic_car(np.arange(10) * 0.25)], states, config)
    wild = synthetic_car([2.5, 2.75, 3.0], first_seq=10)
    wild.loc[1, "seq"] = 2**31 - 1
    [result] = run_batches([wild], states, config)
    assert len(result.rejected) == 1 and "seq 2147483647" in result.rejected[0][2]
    assert result.samples["seq"].tolist() == [10, 12] and result.duplicates == 0


def test_a_wild_first_sample_of_a_run_is_refused_against_its_batch() -> None:
    # No history at all: the batch's own median of the run is the reference.
    states = new_states()
    times = np.arange(40) * 0.25
    batch_frame = pd.concat(
        [synthetic_car(times, driver_number=d) for d in (1, 5, 9)], ignore_index=True
    )  # all on partition 1
    batch_frame.loc[0, "date_us"] += 10**13  # about 116 days ahead
    [result] = run_batches([batch_frame], states, WindowConfig())
    assert len(result.rejected) == 1 and len(result.samples) == 3 * 40 - 1


def test_a_state_written_by_the_first_version_still_decodes() -> None:
    # Version 1 had no `v` and no idle fields: its layout, as msgpack maps.
    old_car = {"run_id": "r", "session_key": "s", "driver_number": 1, "driver": "VER",
               "last_seq": 41, "last_date_us": EPOCH_US, "max_date_us": EPOCH_US,
               "last_values": {"speed": 250.0}, "rates": {"speed": [0.0]},
               "open_windows": [], "feature_history": {}}  # fmt: skip
    raw = msgspec.msgpack.encode({"cars": {"r:1": old_car}, "ended": {"q": {"q:1": 7}}})
    state = PartitionState.decode(raw)
    assert state.v == 1 and state.cars["r:1"].last_seq == 41 and not state.cars["r:1"].idle
    assert state.ended == {"q": {"q:1": 7}}
    assert PartitionState.decode(state.encode()).v == batch.STATE_VERSION


def test_a_silent_car_has_its_windows_closed_and_its_state_trimmed() -> None:
    config = WindowConfig(car_idle_s=60)
    states = new_states()
    # Cars 1 and 5 share partition 1; car 5 stops after 10 s, car 1 goes on to 100 s.
    run_batches([synthetic_car(np.arange(41) * 0.25, driver_number=5)], states, config)
    run_batches([synthetic_car(np.arange(401) * 0.25, driver_number=1)], states, config)
    car = states[1].cars[f"{SYNTHETIC_RUN}:5"]
    assert car.open_windows  # [6, 9) and [9, 12) wait for a watermark that never comes
    windows, changed = batch.close_idle(states, config, now_us=0, caught_up=set())
    assert changed == {1} and car.idle
    assert set(windows["driver_number"].tolist()) == {5}
    assert (windows["window_start_us"] - EPOCH_US).tolist() == [6_000_000, 9_000_000]
    assert not car.open_windows and not car.rates and car.last_seq == 40
    # A sample of a window closed meanwhile is late, not a second copy of the window.
    [back] = run_batches([synthetic_car([11.0], first_seq=41, driver_number=5)], states, config)
    assert back.late == 1 and not back.windows and not car.idle


def test_a_car_silent_on_the_wall_clock_closes_only_once_caught_up() -> None:
    config = WindowConfig(car_idle_s=60)
    states = new_states()
    run_batches([synthetic_car(np.arange(41) * 0.25)], states, config)
    seen = states[1].cars[f"{SYNTHETIC_RUN}:1"].seen_wall_us
    later = seen + 61 * 10**6
    windows, changed = batch.close_idle(states, config, now_us=later, caught_up=set())
    assert not windows and not changed
    windows, changed = batch.close_idle(states, config, now_us=later, caught_up={1})
    assert changed == {1} and len(windows) == 2


def test_idle_cars_are_bounded_however_many_runs_a_partition_sees() -> None:
    config = WindowConfig(car_idle_s=60, idle_cars_kept=5)
    states = new_states()
    for run in range(12):  # runs whose producers died: no end marker ever comes
        frame = synthetic_car(np.arange(8) * 0.25)
        frame["run_id"] = f"dead-{run}"
        run_batches([frame], states, config)
        batch.close_idle(states, config, now_us=10**18, caught_up={1})
    assert len(states[1].cars) == 5
    assert set(states[1].cars) == {f"dead-{r}:1" for r in range(7, 12)}  # the newest


def test_a_car_in_two_partitions_keeps_one_state_in_each() -> None:
    # After a partition increase a car's new samples land on another partition.
    states = new_states()
    first = synthetic_car(np.arange(20) * 0.25)
    moved = synthetic_car(np.arange(20, 40) * 0.25, first_seq=20)
    moved["partition"] = 3
    [result] = run_batches([pd.concat([first, moved], ignore_index=True)], states, WindowConfig())
    assert len(result.samples) == 40 and result.duplicates == 0
    assert states[1].cars[f"{SYNTHETIC_RUN}:1"].last_seq == 19
    assert states[3].cars[f"{SYNTHETIC_RUN}:1"].last_seq == 39


def test_samples_out_of_order_are_new_and_resends_still_duplicates() -> None:
    states = new_states()
    times = np.arange(40) * 0.25
    frame = synthetic_car(times)
    order = np.arange(40)
    order[[10, 11]] = [11, 10]  # a swapped pair
    order[20:25] = [24, 20, 21, 22, 23]  # one overtakes four
    shuffled = frame.iloc[order].reset_index(drop=True)
    [first, second] = run_batches(cut(shuffled, [15]), states, WindowConfig())
    assert first.duplicates == second.duplicates == 0
    assert sorted([*first.samples["seq"], *second.samples["seq"]]) == list(range(40))
    assert not states[1].cars[f"{SYNTHETIC_RUN}:1"].missing  # every gap filled
    [again] = run_batches([frame.iloc[[5, 22, 39]]], states, WindowConfig())
    assert again.duplicates == 3 and again.samples.empty


def test_a_gap_stays_open_for_its_sample_within_a_bound() -> None:
    states = new_states()
    frame = synthetic_car(np.arange(600) * 0.25)
    without = frame[frame["seq"] != 100]
    run_batches([without], states, WindowConfig())
    car = states[1].cars[f"{SYNTHETIC_RUN}:1"]
    assert car.missing == [100, 101] and car.last_seq == 599  # the range [100, 101)
    [straggler] = run_batches([frame[frame["seq"] == 100]], states, WindowConfig())
    assert len(straggler.samples) == 1 and straggler.late == 1  # its window had closed
    assert not car.missing


def test_a_wild_seq_under_the_bound_costs_no_true_sample() -> None:
    # One glitch jumps the car's seq by 1,000; the true samples after it fill the gap.
    states = new_states()
    run_batches([synthetic_car(np.arange(100) * 0.25)], states, WindowConfig())
    wild = synthetic_car([25.0], first_seq=1_100)
    true = synthetic_car(np.arange(100, 1_100) * 0.25, first_seq=100)
    results = run_batches([wild, *cut(true, range(0, 1_000, 97))], states, WindowConfig())
    assert sum(r.duplicates for r in results) == 0
    assert sum(len(r.samples) for r in results) == 1 + 1_000
    assert states[1].cars[f"{SYNTHETIC_RUN}:1"].missing == []


def test_dedupe_matches_a_set_of_seen_seqs_on_random_orders() -> None:
    rng = np.random.default_rng(5)
    for _ in range(200):
        car = batch.CarState(run_id="r", session_key="s", driver_number=1, driver="X")
        seen: set[int] = set()
        seqs = rng.permutation(60)[: rng.integers(1, 60)]
        seqs = np.concatenate((seqs, rng.choice(seqs, size=10)))  # resends too
        for part in np.array_split(seqs, rng.integers(1, 8)):
            if not len(part):
                continue
            fresh = batch._fresh(part.astype(np.int64), car)
            expected = []
            for value in part.tolist():
                expected.append(value not in seen)
                seen.add(value)
            assert fresh.tolist() == expected


@pytest.mark.parametrize("spread", [10**6, 2**61], ids=["a batch's times", "decades apart"])
def test_running_max_per_car_matches_one_car_at_a_time(spread: int) -> None:
    # Every car's running max in one pass (lifted by a step per car, or by rank
    # when the values are too far apart for that), against a loop over the cars.
    rng = np.random.default_rng(11)
    for _ in range(200):
        counts = rng.integers(1, 9, size=rng.integers(1, 12))
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        values = rng.integers(-spread, spread, size=int(counts.sum()))
        bases = rng.integers(-spread, spread, size=len(counts))
        expected = []
        for lo, n, base in zip(starts.tolist(), counts.tolist(), bases.tolist(), strict=True):
            seen = base
            for value in values[lo : lo + n].tolist():
                expected.append(seen)
                seen = max(seen, value)
        before, _ = running_max_before(values, starts, bases)
        assert before.tolist() == expected


def test_one_car_far_ahead_moves_neither_its_run_nor_the_other_cars() -> None:
    states = new_states()
    cars = [synthetic_car(np.arange(41) * 0.25, driver_number=d) for d in (1, 5, 9)]
    run_batches([pd.concat(cars, ignore_index=True)], states, WindowConfig())  # 0 .. 10 s
    glitch = synthetic_car([610.0], first_seq=41, driver_number=1)  # 10 minutes ahead
    next_ones = [synthetic_car([10.25, 10.5], first_seq=41, driver_number=d) for d in (5, 9)]
    [result] = run_batches([pd.concat([glitch, *next_ones], ignore_index=True)], states,
                           WindowConfig())  # fmt: skip
    assert len(result.rejected) == 1 and result.late == 0
    windows, changed = batch.close_idle(states, WindowConfig(), now_us=0, caught_up=set())
    assert not windows and not changed  # nobody looks silent


def test_a_whole_run_resuming_later_is_taken_as_it_is() -> None:
    # The feed paused for two hours and all its cars resume: that is the new clock.
    states = new_states()
    cars = [synthetic_car(np.arange(41) * 0.25, driver_number=d) for d in (1, 5, 9)]
    run_batches([pd.concat(cars, ignore_index=True)], states, WindowConfig())
    later = [synthetic_car(7_200 + np.arange(4) * 0.25, first_seq=41, driver_number=d)
             for d in (1, 5, 9)]  # fmt: skip
    [result] = run_batches([pd.concat(later, ignore_index=True)], states, WindowConfig())
    assert not result.rejected and len(result.samples) == 12 and result.late == 0


@pytest.mark.parametrize("bounds", ["running filters", "gathered"])
def test_rate_outliers_match_a_recomputation_rate_by_rate(
    bounds: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # robust_outliers judges every car's rates at once (the baselines' bounds by
    # running filters over many rates, gathered over few: both here); each rate
    # is judged against the BASELINE_SAMPLES rates before it, history first.
    monkeypatch.setattr(
        anomaly, "RUNNING_FILTERS_FROM", 0 if bounds == "running filters" else 10**9
    )
    rng = np.random.default_rng(3)
    size = anomaly.BASELINE_SAMPLES
    shapes = [(0, 5), (10, 3), (size - 1, 4), (size, 1), (size, 30), (0, size + 10), (3, 0)]
    cars = [
        (rng.normal(0, 5, h), rng.normal(0, 5, r) * np.where(rng.random(r) < 0.1, 40, 1))
        for h, r in shapes
    ]
    floor = 1.0
    counts = [len(rates) for _, rates in cars]
    flat = anomaly.robust_outliers(
        [history.tolist() for history, _ in cars],
        np.concatenate([rates for _, rates in cars]),
        counts,
        floor,
    )
    flagged = np.split(flat, np.cumsum(counts)[:-1])
    for (history, rates), got in zip(cars, flagged, strict=True):
        full = np.concatenate((history, rates))
        expected = []
        for k in range(len(history), len(full)):
            base = full[k - size : k] if k >= size else None
            if base is None:
                expected.append(False)
                continue
            median = np.median(base)
            spread = max(1.4826 * np.median(np.abs(base - median)), floor)
            expected.append(bool(abs(full[k] - median) / spread > anomaly.OUTLIER_Z))
        assert got.tolist() == expected
    assert any(f.any() for f in flagged), "nothing flagged: the check would prove nothing"
