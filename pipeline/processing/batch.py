"""One consumer batch through the per-car logic: de-duplication, anomaly rules,
the robust rolling baseline, and the event-time windows.

Everything is vectorized over the batch; the only Python loop is over the cars
present in it (about 20). Per-car state lives in `PartitionState`, one per Kafka
partition, which the sink stores in the same transaction as the partition's
offset, so a restart resumes exactly where the last commit left off.
"""

from __future__ import annotations

import functools
import itertools
import time
from dataclasses import dataclass, field
from statistics import median
from typing import TYPE_CHECKING

import msgspec

from pipeline.processing import anomaly
from pipeline.processing.columns import Columns, concat, running_max_before
from pipeline.processing.windows import (
    WindowPartial,
    from_partials,
    partial,
    partial_fields,
    partials,
    table_rows,
    window_starts,
)

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

# Cars of finished runs are remembered (just their last seq, to refuse replays of
# old samples) for this many runs per partition. Forgetting is safe: a resend of
# a forgotten car's samples is caught by the database's keys (`telemetry_db`).
ENDED_RUNS_KEPT = 50

# Layout of the stored state. Fields are only ever added, with defaults, so a
# state written by an older version decodes; bump this when a field is added.
# 1: the first release (no `v`); 2: idle cars (`seen_wall_us`, `idle`) and
# out-of-order seqs (`missing`).
STATE_VERSION = 2

OUT_OF_BOUNDS = "out_of_bounds"
# Gaps below a car's highest seq remembered per car (ranges of seqs not seen yet).
MISSING_KEPT = 256


class CarState(msgspec.Struct):
    """What one car's next batch needs from the previous ones."""

    run_id: str
    session_key: str
    driver_number: int
    driver: str
    last_seq: int = -1
    last_date_us: int | None = None  # event time of the previous sample (for gaps, rates)
    max_date_us: int | None = None  # latest event time seen (the watermark's base)
    last_values: dict[str, float] = {}
    rates: dict[str, list[float]] = {}  # latest rates per channel, for the baseline
    open_windows: list[WindowPartial] = []
    feature_history: dict[str, list[float]] = {}  # the models' rolling inputs (ml.features)
    seen_wall_us: int = 0  # wall clock of the batch that last had a sample of the car
    idle: bool = False  # silent past the idle time: windows closed, history dropped
    # Seqs below last_seq not seen yet (out of order): flat [lo, hi) pairs, ascending.
    missing: list[int] = []


class PartitionState(msgspec.Struct):
    v: int = 1  # STATE_VERSION of the code that wrote it (absent: version 1)
    cars: dict[str, CarState] = {}
    ended: dict[str, dict[str, int]] = {}  # run_id -> car -> last seq

    def encode(self) -> bytes:
        self.v = STATE_VERSION
        return msgspec.msgpack.encode(self)

    @staticmethod
    def decode(raw: bytes | None) -> PartitionState:
        """Raises msgspec.DecodeError/ValidationError on a state no version wrote."""
        return msgspec.msgpack.decode(raw, type=PartitionState) if raw else PartitionState()


@dataclass(frozen=True)
class WindowConfig:
    window_s: float = 3.0
    allowed_lateness_s: float = 2.0
    gap_s: float = 1.0
    # Bounds relative to the stream (see `_out_of_bounds`) and idle cars (`close_idle`).
    max_event_time_ahead_s: float = 60.0
    max_seq_ahead: int = 100_000
    car_idle_s: float = 60.0
    idle_cars_kept: int = 100

    @property
    def window_us(self) -> int:
        return round(self.window_s * 1e6)


@dataclass
class BatchResult:
    columns: Columns  # the batch without duplicates, with is_late and anomalies
    events: Columns  # one row per (sample, reason): the anomaly event log
    windows: Columns = field(default_factory=lambda: no_windows())  # closed: the table's rows
    duplicates: int = 0
    late: int = 0
    features: pd.DataFrame | None = None  # model features, row for row with `samples`
    # Samples refused by a bound relative to the stream: (partition, offset, reason).
    rejected: list[tuple[int, int, str]] = field(default_factory=list)

    @property
    def samples(self) -> pd.DataFrame:
        """`columns` as a DataFrame (for tools and tests; the consumer keeps columns)."""
        return self.columns.to_pandas()

    @property
    def anomalies(self) -> pd.DataFrame:
        """`events` as a DataFrame."""
        return self.events.to_pandas()


def process(
    frame: pd.DataFrame | Columns,
    states: dict[int, PartitionState],
    config: WindowConfig,
    *,
    with_features: bool = False,
    now_us: int | None = None,
) -> BatchResult:
    """`frame`: decoded samples with `partition`, in arrival order per partition.
    `states`: partition -> state, updated in place. `with_features`: also compute
    the models' features (when models are served). `now_us`: the wall clock,
    when the cars were seen (for `close_idle`)."""
    import numpy as np
    import pandas as pd

    now_us = time.time_ns() // 1000 if now_us is None else now_us
    frame = frame if isinstance(frame, Columns) else Columns.from_pandas(frame)
    if frame.empty:
        empty = frame.take(np.zeros(0, dtype=np.int64))
        empty["is_late"], empty["anomalies"] = np.zeros(0, dtype=bool), np.empty(0, dtype=object)
        return BatchResult(columns=empty, events=_event_log(empty, [], [], []))
    frame = frame.copy()  # columns are added below
    # Grouped by partition and car: a car found in two partitions (moved by a
    # partition increase) keeps two states, and the database keys settle overlaps.
    # Each group is a number (`car_group`, in order of first appearance): its key
    # text ("run:driver") is made once per group, not once per row.
    run_codes, _ = pd.factorize(frame["run_id"])
    car = run_codes * 1000 + frame["driver_number"]  # driver numbers are 0-999 (schema)
    codes, _ = pd.factorize(car * (int(frame["partition"].max()) + 1) + frame["partition"])
    if (np.diff(codes) < 0).any():  # not grouped yet
        order = np.argsort(codes, kind="stable")
        frame, codes = frame.take(order), codes[order]
    frame["car_group"] = codes
    refused = _out_of_bounds(frame, states, config)
    partitions, offsets = frame["partition"], frame["offset"]
    rejected = [(int(partitions[row]), int(offsets[row]), why) for row, why in refused.items()]
    if refused:
        accepted = np.ones(len(frame), dtype=bool)
        accepted[list(refused)] = False
        frame = frame.take(accepted)
        if frame.empty:
            nothing = process(frame, states, config, with_features=with_features, now_us=now_us)
            nothing.rejected = rejected
            return nothing
    flags = anomaly.rule_flags(frame)
    n = len(frame)
    keep = np.ones(n, dtype=bool)
    late = np.zeros(n, dtype=bool)
    gap = np.zeros(n, dtype=bool)
    gap_s = np.full(n, np.nan)
    outliers = {channel: np.zeros(n, dtype=bool) for channel in anomaly.RATE_FLOOR}

    edges = _car_edges(frame)
    date_us = frame["date_us"]
    seq = frame["seq"]
    partition = frame["partition"]
    channels = {c: np.asarray(frame[c], dtype=float) for c in anomaly.RATE_FLOOR}
    cars: list[CarState] = []  # each car with new samples, in row order
    for lo, hi in itertools.pairwise(edges):
        key = car_key(frame, lo)
        state = _car_state(states[int(partition[lo])], key, frame, lo)
        state.seen_wall_us = now_us
        if state.idle:  # back after a silence: its windows closed, its history starts anew
            state.idle = False
        fresh = _fresh(seq[lo:hi], state)
        keep[lo:hi] = fresh
        if fresh.any():
            cars.append(state)
    # The new samples of every car at once, each car's rows together, in arrival order.
    rows = np.flatnonzero(keep)
    starts = np.flatnonzero(np.diff(frame["car_group"][rows], prepend=-1))
    feature_cars = list(zip(np.split(rows, starts[1:]), cars, strict=True)) if cars else []
    if cars:
        # Late: the sample's window closed before it arrived. Late samples are
        # stored and counted, but take no part in gaps, rates or windows.
        times = date_us[rows]
        is_late = _late(times, starts, cars, config)
        late[rows] = is_late
        on_time = ~is_late
        if on_time.any():
            counts = np.add.reduceat(on_time, starts).tolist()
            on_time_rows = rows[on_time]
            _gaps_and_rates(
                channels,
                on_time_rows,
                times[on_time],
                np.flatnonzero(np.diff(frame["car_group"][on_time_rows], prepend=-1)),
                [car for car, n in zip(cars, counts, strict=True) if n],
                config,
                (gap, gap_s, outliers),
            )

    flags[anomaly.SAMPLE_GAP] = gap
    for channel, mask in outliers.items():
        flags[anomaly.OUTLIER_REASON[channel]] = mask
    on_time = keep & ~late
    windows = _fold_windows(frame.take(on_time), states, config)
    samples, events = _attach_anomalies(frame, flags, gap_s, late, keep)
    features = None
    if with_features:
        from pipeline.ml.features import batch_features

        features, histories = batch_features(
            frame, [(rows, car.feature_history or None) for rows, car in feature_cars]
        )
        for (_, car), history in zip(feature_cars, histories, strict=True):
            car.feature_history = history
        if not keep.all():  # pandas' indexing costs a millisecond even when it keeps all
            features = features.loc[np.flatnonzero(keep)].reset_index(drop=True)
    return BatchResult(
        columns=samples,
        events=events,
        windows=windows,
        duplicates=int((~keep).sum()),
        late=int(late[keep].sum()),
        features=features,
        rejected=rejected,
    )


def _fresh(seq: np.ndarray, car: CarState) -> np.ndarray:
    """Which of a car's samples (in arrival order) are new; updates its seqs.

    A resend repeats a seq already seen: at or below the highest one, and not in
    one of the gaps still open below it (`car.missing`, `[lo, hi)` ranges), so a
    sample that comes out of order is new, not a duplicate. A jump of any size
    costs one range, so a wild seq cannot make the car's next samples look like
    resends. Only the newest MISSING_KEPT ranges are remembered: a straggler
    older than those is taken for a resend (and counted as a duplicate)."""
    import numpy as np

    top = car.last_seq
    if seq[0] == top + 1 and (len(seq) == 1 or (np.diff(seq) == 1).all()):
        # The usual case: in order, no gap. Every open gap lies below `top`, so
        # these fill none and open none, whatever gaps the car has.
        car.last_seq = int(seq[-1])
        return np.ones(len(seq), dtype=bool)
    _, first = np.unique(seq, return_index=True)
    once = np.zeros(len(seq), dtype=bool)
    once[first] = True  # the first of repeats within the batch
    in_gap = np.zeros(len(seq), dtype=bool)
    gaps = np.asarray(car.missing, dtype=np.int64).reshape(-1, 2)
    if len(gaps):
        at = np.searchsorted(gaps[:, 0], seq, side="right") - 1
        inside = at >= 0
        in_gap[inside] = seq[inside] < gaps[at[inside], 1]
    fresh = once & ((seq > top) | in_gap)
    ranges = [(int(lo), int(hi)) for lo, hi in gaps]
    for value in np.sort(seq[fresh & in_gap]).tolist():  # gaps filled (out-of-order samples)
        ranges = [part for lo, hi in ranges for part in _without(lo, hi, value)]
    above = np.unique(seq[seq > top])
    if len(above):  # the gaps this batch opened above the old top
        steps = np.concatenate(([top], above))
        ranges += [
            (int(steps[i]) + 1, int(steps[i + 1])) for i in np.flatnonzero(np.diff(steps) > 1)
        ]
    car.missing = [bound for pair in ranges[-MISSING_KEPT:] for bound in pair]
    car.last_seq = max(top, int(seq.max()))
    return fresh


def _without(lo: int, hi: int, value: int) -> list[tuple[int, int]]:
    """The range [lo, hi) with `value` taken out (zero, one or two ranges)."""
    if not lo <= value < hi:
        return [(lo, hi)]
    return [(a, b) for a, b in ((lo, value), (value + 1, hi)) if a < b]


def car_key(frame: Columns, row: int) -> str:
    """The key of the row's car in its partition's state: "run_id:driver_number"."""
    return f"{frame['run_id'][row]}:{frame['driver_number'][row]}"


def _car_edges(frame: Columns) -> list[int]:
    """Row bounds of each (partition, car) group of a grouped frame."""
    import numpy as np

    group = frame["car_group"]
    return [0, *(np.flatnonzero(group[1:] != group[:-1]) + 1).tolist(), len(frame)]


def _run_clocks(state: PartitionState) -> dict[str, tuple[int | None, int]]:
    """run_id -> (its cars' event time, its highest seq) in a partition. The
    median once three or more cars have one (the latest is one car's wild clock
    away from wrong), else the latest. `statistics.median`: a partition's few
    cars, where numpy's call costs ten times the work."""
    dates: dict[str, list[int]] = {}
    seqs: dict[str, int] = {}
    for car in state.cars.values():
        seqs[car.run_id] = max(seqs.get(car.run_id, -1), car.last_seq)
        if car.max_date_us is not None:
            dates.setdefault(car.run_id, []).append(car.max_date_us)
    clocks: dict[str, tuple[int | None, int]] = {}
    for run, seq in seqs.items():
        times = dates.get(run, [])
        clock = None if not times else max(times) if len(times) < 3 else int(median(times))
        clocks[run] = (clock, seq)
    return clocks


def _out_of_bounds(
    frame: Columns, states: dict[int, PartitionState], config: WindowConfig
) -> dict[int, str]:
    """Samples too far ahead of the stream to be true (row of `frame` -> reason).
    Such a sample would move its car's watermark, or its seq, for good: every
    later sample would look late, or like a resend.

    Event time: each sample against the latest accepted one before it, starting
    from the car's own clock or its run's (the median of the run's cars here),
    whichever is later. Where the run's samples in the batch (three or more)
    agree on a later time, the run moved as a whole (a feed resumed after a
    pause) and their median is the reference. A run's very first samples with
    none of that to go by are taken as they come. Seq: against the car's own,
    or for a new car its run's highest."""
    import numpy as np

    ahead_us = config.max_event_time_ahead_s * 1e6
    date_us = frame["date_us"]
    seq = frame["seq"]
    partition = frame["partition"]
    run = frame["run_id"]
    reasons: dict[int, str] = {}
    clocks = {p: _run_clocks(states[p]) for p in {int(x) for x in np.unique(partition)}}
    in_batch: dict[tuple[int, str], tuple[float | None, float | None]] = {}
    cars: list[tuple[int, int, str, float | None, int]] = []  # lo, hi, key, ref, seq_ref
    for lo, hi in itertools.pairwise(_car_edges(frame)):
        p, run_id = int(partition[lo]), str(run[lo])
        key = car_key(frame, lo)
        car = states[p].cars.get(key)
        run_date, run_seq = clocks[p].get(run_id, (None, -1))
        if (p, run_id) not in in_batch:
            rows = (partition == p) & (run == run_id)
            enough = rows.sum() >= 3  # a median of three outvotes one wild sample
            in_batch[(p, run_id)] = (
                float(np.median(date_us[rows])) if enough else None,
                float(np.median(seq[rows])) if enough else None,
            )
        batch_date, batch_seq = in_batch[(p, run_id)]
        known = [t for t in (car.max_date_us if car else None, run_date) if t is not None]
        ref: float | None = max(known) if known else None
        if batch_date is not None and (ref is None or batch_date > ref + ahead_us):
            ref = batch_date
        seq_ref = car.last_seq if car is not None and car.last_seq >= 0 else run_seq
        if seq_ref < 0 and batch_seq is not None:
            seq_ref = int(batch_seq)
        cars.append((lo, hi, key, ref, seq_ref))
    # Every sample against its car's starting clock at once: one ahead of the
    # latest accepted before it is ahead of that start too, so only the cars
    # with such a sample (rare) are judged sample by sample below.
    counts = [hi - lo for lo, hi, *_ in cars]
    start = np.repeat([date_us[lo] if ref is None else ref for lo, _, _, ref, _ in cars], counts)
    seq_ref_of = np.repeat([seq_ref for *_, seq_ref in cars], counts)
    too_far = (seq > seq_ref_of + config.max_seq_ahead) & (seq_ref_of >= 0)
    suspect = too_far | (date_us > start + ahead_us)
    if not suspect.any():
        return reasons
    for lo, hi, key, ref, seq_ref in cars:
        if not suspect[lo:hi].any():
            continue
        dates = date_us[lo:hi].astype(float)
        too_late = np.zeros(hi - lo, dtype=bool)
        for _ in range(8):  # each sample against the accepted ones before it
            accepted = np.where(too_late, -np.inf, dates)
            first = dates[0] if ref is None else ref
            before = np.maximum.accumulate(np.concatenate(([first], accepted)))[:-1]
            flagged = dates > before + ahead_us
            if (flagged == too_late).all():
                break
            too_late = flagged
        for i in np.flatnonzero(too_late | too_far[lo:hi]).tolist():
            if too_late[i]:
                reasons[lo + i] = (
                    f"event time {(date_us[lo + i] - (ref or dates[0])) / 1e6:.0f} s ahead of "
                    f"car {key}'s clock (the most is "
                    f"{config.max_event_time_ahead_s:g} s)"
                )
            else:
                reasons[lo + i] = (
                    f"seq {seq[lo + i]} is {seq[lo + i] - seq_ref:.0f} ahead of the car's "
                    f"(the most is {config.max_seq_ahead})"
                )
    return reasons


def close_idle(
    states: dict[int, PartitionState],
    config: WindowConfig,
    *,
    now_us: int,
    caught_up: set[int],
) -> tuple[Columns, set[int]]:
    """Close the windows of cars silent for longer than `config.car_idle_s` and
    trim their state to what refuses resends (last seq and clock). Silent means:
    its run's event time moved on that far without it, or, on a partition the
    consumer has read to its end (`caught_up`), that long on the wall clock (a
    run whose producer died sends nothing more). Idle cars beyond
    `idle_cars_kept` per partition are forgotten, oldest first. Returns the
    closed windows and the partitions whose state changed."""
    closed: list[tuple[CarState, WindowPartial]] = []
    changed: set[int] = set()
    idle_us = config.car_idle_s * 1e6
    lateness_us = round(config.allowed_lateness_s * 1e6)
    for p, state in states.items():
        clocks = _run_clocks(state)
        for car in state.cars.values():
            if car.idle or car.max_date_us is None:
                continue
            run_date = clocks[car.run_id][0] or car.max_date_us
            silent_event = run_date - car.max_date_us > idle_us
            silent_wall = p in caught_up and now_us - car.seen_wall_us > idle_us
            if not (silent_event or silent_wall):
                continue
            closed += [(car, w) for w in car.open_windows]
            if car.open_windows:  # a sample still to come for a closed window is late
                last_end = max(w.start_us for w in car.open_windows) + config.window_us
                car.max_date_us = max(car.max_date_us, last_end + lateness_us)
            car.open_windows, car.rates, car.last_values, car.feature_history = [], {}, {}, {}
            car.idle = True
            changed.add(p)
        idle = sorted((c.seen_wall_us, k) for k, c in state.cars.items() if c.idle)
        for _, key in idle[: max(0, len(idle) - config.idle_cars_kept)]:
            del state.cars[key]
            changed.add(p)
    return _closing(closed, config), changed


def end_run(state: PartitionState, run_id: str, config: WindowConfig) -> Columns:
    """The run's end marker arrived on this partition: close its cars' windows."""
    closed: list[tuple[CarState, WindowPartial]] = []
    finished = {key: car for key, car in state.cars.items() if key.startswith(f"{run_id}:")}
    for key, car in finished.items():
        closed += [(car, w) for w in car.open_windows]
        del state.cars[key]
    ended = state.ended.setdefault(run_id, {})  # a repeated end marker forgets nothing
    ended.update({key: car.last_seq for key, car in finished.items()})
    for old in list(state.ended)[:-ENDED_RUNS_KEPT]:
        del state.ended[old]
    return _closing(closed, config)


def _late(
    times: np.ndarray, starts: np.ndarray, cars: list[CarState], config: WindowConfig
) -> np.ndarray:
    """Which of the cars' new samples came after their window closed: against the
    latest event time seen before each (the car's clock, else its first sample
    here), less the allowed lateness. Moves each car's clock."""
    import numpy as np

    bases = np.array(
        [t if (t := car.max_date_us) is not None else times[start]
         for car, start in zip(cars, starts.tolist(), strict=True)],
        dtype=np.int64,
    )  # fmt: skip
    seen_before, newest = running_max_before(times, starts, bases)
    watermark_before = seen_before - config.allowed_lateness_s * 1e6
    for car, latest in zip(cars, newest.tolist(), strict=True):
        car.max_date_us = latest
    is_late: np.ndarray = window_starts(times, config.window_us) + config.window_us <= (
        watermark_before
    )
    return is_late


def _gaps_and_rates(
    channels: dict[str, np.ndarray],
    rows: np.ndarray,
    times: np.ndarray,
    starts: np.ndarray,
    cars: list[CarState],
    config: WindowConfig,
    out: tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]],
) -> None:
    """Sample gaps (against the latest earlier sample), and per channel each
    rate judged against its car's robust rolling baseline, for the cars'
    on-time `rows` (grouped by car, each car's first at `starts`, in arrival
    order; `cars` their states, in the same order). Fills `out`: the batch's gap
    flags and lengths, and per channel its outliers. Updates the states."""
    import numpy as np

    gap, gap_s, outliers = out
    bounds = [*starts.tolist(), len(rows)]
    bases = np.array(
        [car.last_date_us or times[start] for car, start in zip(cars, bounds[:-1], strict=True)],
        dtype=np.int64,
    )
    latest_before, newest = running_max_before(times, starts, bases)
    step_us = times - latest_before
    gap[rows] = step_us > config.gap_s * 1e6
    gap_s[rows] = step_us / 1e6
    seconds = np.maximum(step_us / 1e6, 1e-3)
    last_rows = [hi - 1 for hi in bounds[1:]]
    for channel, floor in anomaly.RATE_FLOOR.items():
        values = channels[channel][rows]
        before = np.empty_like(values)
        before[1:] = values[:-1]
        before[starts] = [car.last_values.get(channel, np.nan) for car in cars]
        rates = (values - before) / seconds
        valid = np.isfinite(rates) & (step_us > 0)
        new, counts = rates[valid], np.add.reduceat(valid, starts).tolist()
        histories = [car.rates.get(channel, []) for car in cars]
        outliers[channel][rows[valid]] = anomaly.robust_outliers(histories, new, counts, floor)
        new_rates = new.tolist()
        ends = itertools.accumulate(counts)
        for car, history, end, count, last in zip(
            cars, histories, ends, counts, values[last_rows].tolist(), strict=True
        ):
            kept = history + new_rates[end - count : end]
            car.rates[channel] = kept[-anomaly.BASELINE_SAMPLES :]
            car.last_values[channel] = last
    for car, latest in zip(cars, newest.tolist(), strict=True):
        car.last_date_us = latest


def _car_state(partition: PartitionState, key: str, frame: Columns, row: int) -> CarState:
    state = partition.cars.get(key)
    if state is None:
        run_id = key.rsplit(":", 1)[0]
        state = CarState(
            run_id=run_id,
            session_key=str(frame["session_key"][row]),
            driver_number=int(frame["driver_number"][row]),
            driver=str(frame["driver"][row]),
            last_seq=partition.ended.get(run_id, {}).get(key, -1),
        )
        partition.cars[key] = state
    return state


def _fold_windows(
    on_time: Columns, states: dict[int, PartitionState], config: WindowConfig
) -> Columns:
    """Merge the batch's partial windows into each car's open ones and close
    every window its watermark has passed: the closed ones as the table's rows.
    Per car, only the windows its state keeps open are objects (one or two);
    the batch's windows that close at once stay columns. The loop over a car's
    windows is plain Python on their starts: a handful per car, where a numpy
    call each cost more at 1x (one window per car and batch) than the objects."""
    import numpy as np

    new = partials(on_time, config.window_us)
    if new.empty:
        return no_windows()
    window_us, lateness_us = config.window_us, config.allowed_lateness_s * 1e6
    starts = new["start_us"].tolist()
    fields = partial_fields(new)
    edges = [*np.flatnonzero(np.diff(new["car_group"], prepend=-1)).tolist(), len(new)]
    # Each car's first row in the batch (the frame is grouped in car_group order).
    rows = np.searchsorted(on_time["car_group"], new["car_group"][edges[:-1]]).tolist()
    partitions = on_time["partition"][rows].tolist()
    cars: list[CarState] = []
    closed_new: list[int] = []  # rows of `new` that close as they are
    car_of: list[int] = []  # their car, in `cars`
    closed_open: list[tuple[CarState, WindowPartial]] = []  # windows a state held open
    for (lo, hi), row, partition in zip(itertools.pairwise(edges), rows, partitions, strict=True):
        car = states[partition].cars[car_key(on_time, row)]
        assert car.max_date_us is not None
        watermark = car.max_date_us - lateness_us
        fresh = {starts[i]: i for i in range(lo, hi)}  # a car's starts are unique
        still_open = []
        for window in car.open_windows:
            more = fresh.pop(window.start_us, None)
            if more is not None:  # the batch has more of a window left open
                window.merge(partial(fields, more))
            if window.start_us + window_us <= watermark:
                closed_open.append((car, window))
            else:
                still_open.append(window)
        for start, i in fresh.items():
            if start + window_us <= watermark:
                closed_new.append(i)
                car_of.append(len(cars))
            else:
                still_open.append(partial(fields, i))
        cars.append(car)
        car.open_windows = sorted(still_open, key=lambda window: window.start_us)
    closing = _closing(closed_open, config)
    if not closed_new:
        return closing
    closed = _closed(cars, new.take(np.array(closed_new)), np.array(car_of), config)
    return concat([closed, closing])


def _closing(closed: list[tuple[CarState, WindowPartial]], config: WindowConfig) -> Columns:
    """Windows a state held open, closed: the table's rows."""
    import numpy as np

    if not closed:
        return no_windows()
    cars = [car for car, _ in closed]
    windows = from_partials([window for _, window in closed], np.zeros(len(closed)))
    return _closed(cars, windows, np.arange(len(cars)), config)


def _closed(
    cars: list[CarState], windows: Columns, car_of: np.ndarray, config: WindowConfig
) -> Columns:
    """Closed windows (`partials` columns) as the table's rows: with each one's car
    (`cars[car_of[row]]`) named."""
    import numpy as np

    columns = {
        "run_id": np.array([car.run_id for car in cars], dtype=object)[car_of],
        "session_key": np.array([car.session_key for car in cars], dtype=object)[car_of],
        "driver_number": np.array([car.driver_number for car in cars], dtype=np.int64)[car_of],
        "driver": np.array([car.driver for car in cars], dtype=object)[car_of],
        **table_rows(windows, config.window_us),
    }
    return Columns(columns, len(windows))


def no_windows() -> Columns:
    """No closed window, with the table's columns (a new mapping of arrays made
    once: most batches at 1x close none)."""
    return _no_windows().copy()


@functools.cache
def _no_windows() -> Columns:
    import numpy as np

    empty = from_partials([], np.zeros(0))
    return _closed([], empty, np.zeros(0, dtype=np.int64), WindowConfig())


def _attach_anomalies(
    frame: Columns,
    flags: dict[str, np.ndarray],
    gap_s: np.ndarray,
    late: np.ndarray,
    keep: np.ndarray,
) -> tuple[Columns, Columns]:
    """Reason lists per sample, and the long event log (one row per reason)."""
    import numpy as np

    value_of = {
        anomaly.SAMPLE_GAP: gap_s,
        anomaly.IMPOSSIBLE_RPM: frame["rpm"],
        anomaly.RPM_OUTLIER: frame["rpm"],
        anomaly.IMPOSSIBLE_GEAR: frame["gear"],
        anomaly.IMPOSSIBLE_THROTTLE: frame["throttle"],
        anomaly.IMPOSSIBLE_BRAKE: frame["brake"],
        anomaly.GEAR_SPEED_RPM_MISMATCH: frame["gear"],
    }
    reasons = np.full(len(frame), None, dtype=object)
    rows_of, reason_of, value_at = [], [], []
    for reason in anomaly.REASONS:
        rows = np.flatnonzero(flags[reason] & keep)
        if not len(rows):
            continue
        for i in rows.tolist():
            if reasons[i] is None:
                reasons[i] = []
            reasons[i].append(reason)
        rows_of.append(rows)
        reason_of += [reason] * len(rows)
        value_at.append(np.asarray(value_of.get(reason, frame["speed"]), dtype=float)[rows])
    log = _event_log(frame, rows_of, reason_of, value_at)
    frame["is_late"] = late
    frame["anomalies"] = reasons
    return (frame if keep.all() else frame.take(keep)), log


EVENT_FIELDS = ("run_id", "session_key", "driver_number", "driver", "seq", "date_us")


def _event_log(
    frame: Columns, rows_of: list[np.ndarray], reasons: list[str], values: list[np.ndarray]
) -> Columns:
    """The event log: each flagged row's identity, its reason and the value judged."""
    import numpy as np

    rows = np.concatenate(rows_of) if rows_of else np.zeros(0, dtype=np.int64)
    log = {c: frame[c][rows] for c in EVENT_FIELDS}
    log["reason"] = np.array(reasons, dtype=object)
    log["value"] = np.concatenate(values) if values else np.zeros(0)
    return Columns(log, len(rows))
