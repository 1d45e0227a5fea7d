"""A synthetic EA F1 game UDP session (F1 24 or F1 25 format), datagram by datagram.

`synthetic_session()` yields `(t, datagram)` of a whole race at Monza as the game
would send it to port 20777: the Event `SSTA`, Session and Participants packets,
then every frame Motion, LapData, CarTelemetry and CarStatus for all cars, and
the Event `SEND` a couple of seconds after the last car took the flag. Every
datagram has the exact size and layout of `udp_packets.PACKETS`, so it goes
through `PacketParser` and the feed like the game's own.

What it is for: tests and benchmarks of the UDP path at the game's full rate
(60 Hz, 22 cars), which the real recording in ../shared/data/f1-udp cannot give
(it is one car, sparse, F1 24 only). The values are plausible, not the game's:
that recording stays the reference for what real values look like.

The race, deterministic for a seed: each car has a base lap time within ±2 % of
`lap_s` (grid ordered by pace), a standing start, one pit stop (when `laps` >= 2)
at the end of a lap between 1 and `laps` - 1 (pit limiter, ~2.5 s stationary,
soft to medium tyres), and a cool-down after the flag. Speeds follow a smooth
Monza-like profile (straights at ~335 km/h, chicanes at 95-125 km/h) scaled to
an 80 s lap; a `lap_s` other than 80 compresses or stretches the session clock
(distances advance faster or slower, the pit lane too) while the reported speeds
stay plausible; the wait on the grid and the 2.5 s stop keep their durations.

How it stays fast: the whole race is planned up front per car and lap (a handful
of numbers per lap plus lookup tables of time along the lap), then each batch of
about one second of frames is evaluated for all cars at once with numpy (no
Python loop per car or per frame) and written into structured arrays, one
datagram per record. Nothing but the current batch is held in memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.sources.udp_packets import (
    CAR_STATUS,
    CAR_TELEMETRY,
    CARS,
    EVENT,
    FORMATS,
    HEADER,
    LAP_DATA,
    MOTION,
    PACKETS,
    PARTICIPANTS,
    SESSION,
)

# The session.
TRACK_ID = 11  # Monza
TRACK_LENGTH = 5793  # metres, the game's Session value for Monza
SESSION_TYPE_RACE = 15
SESSION_DURATION_S = 7200  # a race's two-hour limit, counted down in session_time_left
PIT_LIMIT_KMH = 80.0
MOTION_SIZE = 1349  # F1 24 and F1 25; the platform ignores Motion, only its size matters
MAX_RATE_HZ = 120.0
MAX_LAP_S = 3600.0
SESSION_EVERY_S = 0.5  # the game's Session rate (2 Hz)
PARTICIPANTS_EVERY_S = 5.0
TAIL_S = 2.0  # frames sent after the last car finished, before SEND

# The track: Monza-like corners as dips in a smooth speed profile. Each dip is an
# asymmetric Gaussian (short braking side, long acceleration side); the profile
# is their product, smooth everywhere, then scaled so a lap takes REF_LAP_S.
REF_LAP_S = 80.0
V_TOP_KMH = 340.0
# (apex m, apex km/h, braking sigma m, exit sigma m, steer direction: +1 right)
CORNERS = (
    (850.0, 95.0, 40.0, 190.0, 1.0),  # Variante del Rettifilo
    (1560.0, 290.0, 60.0, 150.0, 1.0),  # Curva Biassono
    (2150.0, 125.0, 40.0, 190.0, -1.0),  # Variante della Roggia
    (2600.0, 190.0, 45.0, 140.0, 1.0),  # Lesmo 1
    (2870.0, 180.0, 45.0, 200.0, 1.0),  # Lesmo 2
    (3950.0, 200.0, 50.0, 220.0, -1.0),  # Variante Ascari
    (5050.0, 215.0, 55.0, 260.0, 1.0),  # Curva Alboreto (Parabolica)
)
STEER_SIGMA_M = 40.0
DRS_ZONE = (5350.0, 650.0)  # the main straight, across the line: the longest one
SECTORS = (TRACK_LENGTH / 3, 2 * TRACK_LENGTH / 3)
GRID_STEP_M = 2.0  # resolution of the time-along-the-lap tables

# The pit lane runs beside the main straight, across the line (as at Monza).
PIT_ENTRY = TRACK_LENGTH - 150.0
PIT_BOX = 70.0
PIT_EXIT = 195.0
STOP_S = 2.5

# Accelerations (m/s², in reported-speed terms) of the parts the profile lacks.
A_LAUNCH = 9.0  # standing start
A_PIT_BRAKE = 35.0  # down to the limiter before the pit entry
A_BOX = 6.0  # into and out of the box
A_PIT_EXIT = 8.0  # from the limiter back to racing speed
A_COAST = 3.0  # after the flag
COOL_FROM_KMH, COOL_KMH = 350.0, 120.0  # the cool-down settles at COOL_KMH
A_LIFT = 4.0  # decelerating harder than this brakes; gentler is lifting
A_BRAKE_FULL = 45.0  # the deceleration that takes a full brake

LIGHTS_OUT_S = 1.0
GRID_STAGGER_S = 0.15  # each grid slot launches a little later (they stand further back)

# Drivetrain: upshift speeds (km/h) for gears 1-7; rpm climbs through each gear.
UPSHIFT_KMH = np.array([100.0, 135.0, 170.0, 205.0, 240.0, 275.0, 305.0])
GEAR_LO_KMH = np.concatenate([[0.0, 0.0], UPSHIFT_KMH])  # indexed by gear (0 unused)
GEAR_HI_KMH = np.concatenate([[1.0], UPSHIFT_KMH, [350.0]])
GEAR_RPM_LO = np.array([4000.0, 4000.0] + [10_500.0] * 7)
GEAR_RPM_HI = 12_500.0
IDLE_RPM, MAX_RPM, MAX_GEARS = 4000, 13_000, 8

# Tyres: CarStatus compounds. Visual 16 soft, 17 medium; actual 16 = C5, 17 = C4
# (Monza's soft and medium, and what the real recording's soft reads: 16/16).
SOFT = (16, 16)  # (visual, actual)
MEDIUM = (17, 17)
COLD_PRESSURE_PSI = np.array([22.0, 22.0, 24.5, 24.5])  # RL, RR, FL, FR as recorded
WHEEL_HEAT = np.array([0.0, 0.0, 2.0, 2.0])  # fronts run a little hotter
FUEL_CAPACITY = 110.0

# The drivers: (name, race number, driver id, nationality id), two per team.
ROSTER = (
    (b"VERSTAPPEN", 1, 9, 22), (b"PEREZ", 11, 14, 52),
    (b"HAMILTON", 44, 7, 10), (b"RUSSELL", 63, 50, 10),
    (b"LECLERC", 16, 58, 53), (b"SAINZ", 55, 0, 77),
    (b"NORRIS", 4, 54, 10), (b"PIASTRI", 81, 112, 3),
    (b"ALONSO", 14, 3, 77), (b"STROLL", 18, 19, 13),
    (b"GASLY", 10, 59, 28), (b"OCON", 31, 17, 28),
    (b"ALBON", 23, 62, 80), (b"LATIFI", 6, 63, 13),
    (b"RICCIARDO", 3, 2, 3), (b"TSUNODA", 22, 94, 43),
    (b"MAGNUSSEN", 20, 11, 21), (b"HULKENBERG", 27, 10, 29),
    (b"BOTTAS", 77, 15, 27), (b"ZHOU", 24, 80, 15),
    (b"LAWSON", 30, 113, 54), (b"SCHUMACHER", 47, 81, 29),
)  # fmt: skip
# Team ids of the pairs above (Red Bull, Mercedes, Ferrari, McLaren, Aston Martin,
# Alpine, Williams, RB, Haas, Sauber); with 22 cars the 11th pair repeats the first.
TEAMS = (2, 0, 1, 8, 4, 5, 3, 6, 7, 9)
TEAM_RGB = {
    0: (39, 244, 210), 1: (232, 0, 45), 2: (54, 113, 198), 3: (100, 196, 255),
    4: (34, 153, 113), 5: (255, 135, 188), 6: (102, 146, 255), 7: (182, 186, 189),
    8: (255, 128, 0), 9: (82, 226, 82),
}  # fmt: skip

MOTION_DTYPE = np.dtype([("header", HEADER), ("rest", f"V{MOTION_SIZE - HEADER.itemsize}")])


def synthetic_session(
    *,
    fmt: int = 2025,
    cars: int = 22,
    laps: int = 3,
    rate_hz: float = 60.0,
    lap_s: float = 80.0,
    seed: int = 0,
    session_uid: int | None = None,
) -> Iterator[tuple[float, bytes]]:
    """`(t, datagram)` of a whole synthetic race, t in seconds since the session
    start and non-decreasing. The arguments are checked here, before the first
    datagram (ValueError), not when iteration starts."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be 2024 (F1 24) or 2025 (F1 25), not {fmt!r}")
    if not 1 <= cars <= CARS:
        raise ValueError(f"cars must be 1 to {CARS}, not {cars!r}")
    if not 1 <= laps <= 255:
        raise ValueError(f"laps must be 1 to 255 (the Session packet's total_laps), not {laps!r}")
    if not 0 < rate_hz <= MAX_RATE_HZ:
        raise ValueError(f"rate_hz must be above 0 and at most {MAX_RATE_HZ:g}, not {rate_hz!r}")
    if not 0 < lap_s <= MAX_LAP_S:
        raise ValueError(f"lap_s must be above 0 and at most {MAX_LAP_S:g} s, not {lap_s!r}")
    if session_uid is not None and not 0 < session_uid < 2**64:
        raise ValueError(
            f"session_uid must be 1 to 2**64 - 1 (0 means no session), not {session_uid}"
        )
    race = _plan(fmt, cars, laps, float(rate_hz), float(lap_s), seed, session_uid)
    return _datagrams(race)


# --- The plan: everything about the race that does not depend on the frame. ---


@dataclass(frozen=True)
class _Tables:
    """Per lap kind, time and driving along the lap at the nodes `x`.

    Table 0 is a normal lap at pace 1 (scaled per lap by the car's pace), table
    1 the slow laps after the cool-down; the others are one car's special laps
    (start, in-lap, out-lap, cool-down). The nodes 0 and PIT_BOX appear twice:
    the time between the two copies is the wait on the grid and the stop.
    """

    x: np.ndarray  # (G,) lap distance, m
    t: np.ndarray  # (T, G) seconds since the lap started (session time)
    v: np.ndarray  # (T, G) speed, km/h
    throttle: np.ndarray  # (T, G) 0-1
    brake: np.ndarray  # (T, G) 0-1
    steer: np.ndarray  # (G,) -1 (full left) to 1, from the corners only


@dataclass(frozen=True)
class _Race:
    """The whole race, planned: what a batch of frames is computed from."""

    fmt: int
    cars: int
    laps: int
    rate_hz: float
    uid: int
    frames: int  # frames sent, SEND goes with the last one
    tables: _Tables
    flat_t: np.ndarray  # tables.t flattened, offset by table so one search finds any table
    table_offset: float
    # Per car and lap (cars, K): the lap's table, its time scale (normal laps run
    # table 0 at the car's pace: table time = elapsed * scale, speed = table speed
    # * scale), lap starts (cars, K + 1), sector 1 and 2 times.
    tid: np.ndarray
    scale: np.ndarray
    starts: np.ndarray
    flat_starts: np.ndarray
    start_offset: float
    sector1_s: np.ndarray
    sector2_s: np.ndarray
    # Per car.
    grid: np.ndarray
    launch_s: np.ndarray  # when the car leaves the grid
    finish_s: np.ndarray
    pit_lap: np.ndarray  # the lap (1-based) at whose end it pits, 0 = none
    lane_in: np.ndarray  # session times of the stop (inf without one)
    box_in: np.ndarray
    box_out: np.ndarray
    lane_out: np.ndarray
    in_lap_start: np.ndarray
    out_lap_end: np.ndarray
    fuel_start: float
    fuel_per_lap: float


def _profile(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unscaled speed (km/h) and steer at lap distances x: the corners' dips."""
    factor = np.ones_like(x)
    steer = np.zeros_like(x)
    for apex, v_apex, sigma_in, sigma_out, direction in CORNERS:  # a loop over 7 corners
        d = (x - apex + TRACK_LENGTH / 2) % TRACK_LENGTH - TRACK_LENGTH / 2
        depth = 1.0 - v_apex / V_TOP_KMH
        factor *= 1.0 - depth * np.exp(-0.5 * (d / np.where(d < 0, sigma_in, sigma_out)) ** 2)
        steer += direction * 0.5 * depth * np.exp(-0.5 * (d / STEER_SIGMA_M) ** 2)
    return V_TOP_KMH * factor, steer


def _cone(v0_kmh: float, accel: float, dist: np.ndarray) -> np.ndarray:
    """The highest speed (km/h) reachable `dist` metres from a point passed at
    `v0_kmh` with a constant `accel`: caps braking into and accelerating out of it."""
    speed: np.ndarray = 3.6 * np.sqrt((v0_kmh / 3.6) ** 2 + 2.0 * accel * np.maximum(dist, 0.0))
    return speed


def _nodes() -> np.ndarray:
    """Lap distances of the table nodes: a regular grid plus the exact points
    the race looks up (pit and sector marks); 0 and PIT_BOX twice."""
    count = math.ceil(TRACK_LENGTH / GRID_STEP_M) + 1
    marks = [PIT_ENTRY, PIT_EXIT, *SECTORS]
    base = np.linspace(0.0, TRACK_LENGTH, count)
    base = base[~np.isin(base, [0.0, PIT_BOX, *marks])]
    return np.sort(np.concatenate([[0.0, 0.0, PIT_BOX, PIT_BOX], marks, base]))


def _speed_caps(
    x: np.ndarray, ref: np.ndarray, pace: np.ndarray, kinds: dict[str, np.ndarray]
) -> np.ndarray:
    """Speed (km/h) of every table (rows) at x: the car's pace on the profile,
    capped by whatever its lap kind adds (start, pit lane, cool-down)."""
    v: np.ndarray = pace[:, None] * ref[None, :]
    caps = {
        "launch": _cone(0.0, A_LAUNCH, x),
        "pit_in": np.where(
            x >= PIT_ENTRY, PIT_LIMIT_KMH, _cone(PIT_LIMIT_KMH, A_PIT_BRAKE, PIT_ENTRY - x)
        ),
        "pit_out": np.minimum(
            np.where(x <= PIT_EXIT, PIT_LIMIT_KMH, _cone(PIT_LIMIT_KMH, A_PIT_EXIT, x - PIT_EXIT)),
            _cone(0.0, A_BOX, np.abs(x - PIT_BOX)),
        ),
        "cool": 3.6
        * np.sqrt(
            np.maximum((COOL_KMH / 3.6) ** 2, (COOL_FROM_KMH / 3.6) ** 2 - 2.0 * A_COAST * x)
        ),
        "slow": np.full_like(x, COOL_KMH),
    }
    for kind, cap in caps.items():
        v = np.where(kinds[kind][:, None], np.minimum(v, cap[None, :]), v)
    return v


def _tables(
    pace: np.ndarray, kinds: dict[str, np.ndarray], wait_s: np.ndarray, compression: float
) -> _Tables:
    """Time, speed and pedals along the lap for every table at once."""
    x = _nodes()
    raw_ref, steer = _profile(x)
    dx = np.diff(x)
    mid = (x[:-1] + x[1:]) / 2
    raw_mid, _ = _profile(mid)
    # Scale the profile so a normal lap at pace 1 takes REF_LAP_S of real time.
    scale = float(np.sum(dx / (raw_mid / 3.6))) / REF_LAP_S
    ref, ref_mid = raw_ref * scale, raw_mid * scale

    v_mid = _speed_caps(mid, ref_mid, pace, kinds)
    moving = dx > 0
    # Session time per cell: `compression` > 1 when lap_s < REF_LAP_S.
    dt = np.divide(
        dx[None, :], v_mid / 3.6 * compression, out=np.zeros_like(v_mid), where=moving[None, :]
    )
    dt[:, 0] += wait_s  # the two 0 nodes: waiting on the grid (start laps only)
    box = int(np.searchsorted(x, PIT_BOX))
    dt[:, box] += np.where(kinds["pit_out"], STOP_S, 0.0)  # the two PIT_BOX nodes: the stop
    t = np.concatenate([np.zeros((len(pace), 1)), np.cumsum(dt, axis=1)], axis=1)

    v = _speed_caps(x, ref, pace, kinds)
    ms = v / 3.6
    cell_accel = np.divide(
        ms[:, 1:] ** 2 - ms[:, :-1] ** 2,
        2.0 * dx[None, :],
        out=np.zeros_like(v_mid),
        where=moving[None, :],
    )
    # A node takes the acceleration of the cell after it, or before it when that
    # cell has no length (arriving at the box decelerates, leaving accelerates).
    after = np.concatenate([cell_accel, cell_accel[:, -1:]], axis=1)
    before = np.concatenate([cell_accel[:, :1], cell_accel], axis=1)
    accel = np.where(np.concatenate([moving, [False]])[None, :], after, before)
    braking = accel < -A_LIFT
    brake = np.where(braking, np.clip(-accel / A_BRAKE_FULL, 0.05, 1.0), 0.0)
    # Full throttle when accelerating, none when slowing, part in steady corners.
    steady = np.clip(v / 300.0, 0.3, 1.0)
    throttle = np.where(accel > 0.5, 1.0, np.where(accel < -0.5, 0.0, steady))
    return _Tables(x=x, t=t, v=v, throttle=throttle, brake=brake, steer=steer)


def _plan(
    fmt: int, cars: int, laps: int, rate_hz: float, lap_s: float, seed: int, uid: int | None
) -> _Race:
    """Lap by lap, what every car does: paces, grid, pit stop, lap start times."""
    rng = np.random.default_rng(seed)
    drawn_uid = int(rng.integers(1, 2**63))  # drawn always, so a given uid changes nothing else
    spread = rng.uniform(-0.02, 0.02, cars)  # base lap time = lap_s * (1 + spread)
    grid = np.argsort(np.argsort((1 + spread) * (1 + rng.normal(0, 0.003, cars)))) + 1
    launch = LIGHTS_OUT_S + GRID_STAGGER_S * (grid - 1) + rng.uniform(0.0, 0.1, cars)
    lap_noise = np.clip(rng.normal(0.0, 0.002, (cars, laps + 1)), -0.005, 0.005)
    pace = 1.0 / ((1 + spread)[:, None] * (1 + lap_noise))  # (cars, laps + 1), cool-down last
    if laps >= 2:  # a stop at the end of a lap in the middle of the race
        first = min(max(1, round(laps * 0.3)), laps - 1)
        last = min(max(first, round(laps * 0.7)), laps - 1)
        pit_lap = rng.integers(first, last + 1, cars)
    else:
        pit_lap = np.zeros(cars, dtype=np.int64)

    # Which of the laps 0..laps (0-based; lap `laps` is the cool-down) are special.
    lap = np.arange(laps + 1)[None, :]
    shape = (cars, laps + 1)
    kinds_by_lap = {
        "launch": np.broadcast_to(lap == 0, shape),
        "pit_in": (lap == pit_lap[:, None] - 1) & (pit_lap[:, None] > 0),
        "pit_out": (lap == pit_lap[:, None]) & (pit_lap[:, None] > 0),
        "cool": np.broadcast_to(lap == laps, shape),
    }
    special = np.logical_or.reduce(list(kinds_by_lap.values()))
    n_special = int(special.sum())
    # Table rows: 0 normal, 1 slow, then the special laps in (car, lap) order.
    head = [False, False]
    kinds = {kind: np.concatenate([head, flags[special]]) for kind, flags in kinds_by_lap.items()}
    kinds["slow"] = np.concatenate([[False, True], np.zeros(n_special, bool)])
    table_pace = np.concatenate([[1.0, 1.0], pace[special]])
    launch_by_lap = np.broadcast_to(launch[:, None], shape)[special]
    wait = np.where(kinds["launch"], np.concatenate([[0.0, 0.0], launch_by_lap]), 0.0)
    tables = _tables(table_pace, kinds, wait, compression=REF_LAP_S / lap_s)

    tid = np.zeros(shape, dtype=np.int64)
    tid[special] = 2 + np.arange(n_special)
    scale = np.where(special, 1.0, pace)  # normal laps run table 0 at the car's pace
    duration = tables.t[tid, -1] / scale
    finish = np.sum(duration[:, :laps], axis=1)
    end = float(finish.max()) + TAIL_S
    # Slow laps after the cool-down lap until the session ends, as many for all cars.
    slow_s = float(tables.t[1, -1])
    extra = math.ceil(max(0.0, end - float((finish + duration[:, laps]).min())) / slow_s) + 1
    tid = np.concatenate([tid, np.ones((cars, extra), dtype=np.int64)], axis=1)
    scale = np.concatenate([scale, np.ones((cars, extra))], axis=1)
    duration = np.concatenate([duration, np.full((cars, extra), slow_s)], axis=1)
    starts = np.concatenate([np.zeros((cars, 1)), np.cumsum(duration, axis=1)], axis=1)

    node = {mark: int(np.searchsorted(tables.x, mark)) for mark in (PIT_ENTRY, PIT_EXIT, *SECTORS)}
    box = int(np.searchsorted(tables.x, PIT_BOX))  # arriving; box + 1 is leaving
    sector1 = tables.t[tid, node[SECTORS[0]]] / scale
    sector2 = tables.t[tid, node[SECTORS[1]]] / scale - sector1

    rows = np.arange(cars)
    has_pit = pit_lap > 0
    in_lap, out_lap = np.maximum(pit_lap - 1, 0), pit_lap

    def pit_time(lap: np.ndarray, at_node: int) -> np.ndarray:
        """Session time at which each pitting car passes `at_node` on `lap`."""
        at = starts[rows, lap] + tables.t[tid[rows, lap], at_node] / scale[rows, lap]
        return np.where(has_pit, at, np.inf)

    fuel_per_lap = min(1.7, 100.0 / (laps + 1))  # kg; long races burn less to fit the tank
    table_offset = float(tables.t[:, -1].max()) + 1.0
    start_offset = float(starts.max()) + 1.0
    return _Race(
        fmt=fmt, cars=cars, laps=laps, rate_hz=rate_hz,
        uid=drawn_uid if uid is None else uid,
        frames=math.floor(end * rate_hz) + 1,
        tables=tables,
        flat_t=(tables.t + np.arange(len(table_pace))[:, None] * table_offset).ravel(),
        table_offset=table_offset,
        tid=tid, scale=scale, starts=starts,
        flat_starts=(starts + rows[:, None] * start_offset).ravel(),
        start_offset=start_offset,
        sector1_s=sector1, sector2_s=sector2,
        grid=grid, launch_s=launch, finish_s=finish, pit_lap=pit_lap,
        lane_in=pit_time(in_lap, node[PIT_ENTRY]),
        box_in=pit_time(out_lap, box),
        box_out=pit_time(out_lap, box + 1),
        lane_out=pit_time(out_lap, node[PIT_EXIT]),
        in_lap_start=np.where(has_pit, starts[rows, in_lap], np.inf),
        out_lap_end=np.where(has_pit, starts[rows, out_lap + 1], np.inf),
        fuel_start=fuel_per_lap * laps + 2.0, fuel_per_lap=fuel_per_lap,
    )  # fmt: skip


# --- One batch of frames: every car's state at the frames' times, at once. ---


@dataclass(frozen=True)
class _State:
    """Every car at every frame of a batch: arrays of shape (frames, cars)."""

    t: np.ndarray  # (frames,) session time
    lap: np.ndarray  # 0-based lap index (laps and above: after the flag)
    elapsed: np.ndarray  # seconds into the lap
    x: np.ndarray  # lap distance, m
    total: np.ndarray  # total distance, m
    speed: np.ndarray  # km/h
    throttle: np.ndarray
    brake: np.ndarray
    steer: np.ndarray
    position: np.ndarray
    finished: np.ndarray
    in_lane: np.ndarray
    in_box: np.ndarray  # stationary in the pit box
    new_tyres: np.ndarray  # after the stop


def _lookup(
    flat: np.ndarray, per_row: int, row: np.ndarray, q: np.ndarray, offset: float
) -> tuple[np.ndarray, np.ndarray]:
    """Search many sorted rows laid end to end at once: the index within its
    row of the last entry <= q, and the fraction to the next one. Each row is
    offset by `offset` in `flat`, so one searchsorted serves every car/table."""
    key = q + row * offset
    at = np.clip(np.searchsorted(flat, key, side="right") - 1, 0, flat.size - 2)
    lo, hi = flat[at], flat[at + 1]
    frac = np.clip(np.divide(key - lo, hi - lo, out=np.zeros_like(key), where=hi > lo), 0.0, 1.0)
    return at - row * per_row, frac


def _state(race: _Race, t: np.ndarray) -> _State:
    """Every car at the session times `t`: its lap from the lap starts, then
    distance, speed and pedals from its lap's table, then what follows."""
    cars, tables = race.cars, race.tables
    car = np.broadcast_to(np.arange(cars)[None, :], (len(t), cars))
    tt = np.broadcast_to(t[:, None], car.shape)
    k_max = race.tid.shape[1]
    lap, _ = _lookup(race.flat_starts, k_max + 1, car, tt, race.start_offset)
    lap = np.clip(lap, 0, k_max - 1)
    elapsed = tt - race.starts[car, lap]
    tid, scale = race.tid[car, lap], race.scale[car, lap]
    nodes = tables.x.size
    node, frac = _lookup(race.flat_t, nodes, tid, elapsed * scale, race.table_offset)
    # At (or, by rounding, past) a lap's last node: the end of the last cell.
    frac = np.where(node >= nodes - 1, 1.0, frac)
    node = np.clip(node, 0, nodes - 2)

    def at(values: np.ndarray) -> np.ndarray:
        lo, hi = values[tid, node], values[tid, node + 1]
        value: np.ndarray = lo + frac * (hi - lo)
        return value

    x = np.clip(tables.x[node] + frac * (tables.x[node + 1] - tables.x[node]), 0.0, TRACK_LENGTH)
    in_box = (tt >= race.box_in) & (tt < race.box_out)
    moving = ~(in_box | (tt < race.launch_s))  # not in the box, not waiting on the grid
    # Rounded here as the packet carries it, so gear and rpm follow the sent speed.
    speed = np.where(moving, np.round(at(tables.v) * scale), 0.0)
    finished = lap >= race.laps
    total = lap * TRACK_LENGTH + x
    # Positions: the finished in the order they finished, then by distance; the
    # grid breaks ties (everyone at 0 m before the start).
    score = np.where(finished, 1e12 - race.finish_s, total)
    order = np.lexsort((np.broadcast_to(race.grid, car.shape), -score), axis=-1)
    position = np.empty_like(order)
    np.put_along_axis(position, order, np.arange(1, cars + 1)[None, :], axis=1)
    return _State(
        t=t, lap=lap, elapsed=elapsed, x=x, total=total, speed=speed,
        throttle=np.where(moving, at(tables.throttle), 0.0),
        brake=np.where(moving, at(tables.brake), 0.0),
        steer=np.interp(x, tables.x, tables.steer),
        position=position, finished=finished,
        in_lane=(tt >= race.lane_in) & (tt < race.lane_out), in_box=in_box,
        new_tyres=tt >= race.lane_out,
    )  # fmt: skip


def _gear_rpm(speed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gear 1-8 from speed (monotone), and rpm climbing through each gear."""
    gear = 1 + np.searchsorted(UPSHIFT_KMH, speed, side="right")
    lo, hi = GEAR_LO_KMH[gear], GEAR_HI_KMH[gear]
    through = np.clip((speed - lo) / (hi - lo), 0.0, 1.0)
    rpm = GEAR_RPM_LO[gear] + through * (GEAR_RPM_HI - GEAR_RPM_LO[gear])
    return gear, rpm


def _drs(s: _State) -> np.ndarray:
    """DRS open (and allowed): on the main straight from lap 2, racing, not in
    the pit lane."""
    start, end = DRS_ZONE
    in_zone: np.ndarray = (s.lap >= 1) & ~s.finished & ~s.in_lane & ((s.x >= start) | (s.x < end))
    return in_zone


def _split_ms(seconds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A time as the spec's (milliseconds part, minutes part)."""
    ms = np.round(seconds * 1000).astype(np.int64)
    return ms % 60_000, ms // 60_000


# --- Datagrams. ---


def _records(race: _Race, packet_id: int, frames: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Zeroed packets of one type for a batch of frames, headers filled."""
    dtype = MOTION_DTYPE if packet_id == MOTION else PACKETS[(race.fmt, packet_id)]
    rec = np.zeros(len(frames), dtype=dtype)
    head = rec["header"]
    head["packet_format"] = race.fmt
    head["game_year"] = race.fmt - 2000
    head["game_major"] = 1
    head["packet_version"] = 1
    head["packet_id"] = packet_id
    head["session_uid"] = race.uid
    head["session_time"] = t
    head["frame"] = frames
    head["overall_frame"] = frames
    head["player_car"] = 0
    head["secondary_player_car"] = 255
    return rec


def _split(rec: np.ndarray) -> list[bytes]:
    """One datagram per record."""
    buf, size = rec.tobytes(), rec.dtype.itemsize
    return [buf[i : i + size] for i in range(0, len(buf), size)]


def _lap_data(race: _Race, s: _State, frames: np.ndarray) -> np.ndarray:
    """LapData packets: laps, distances, positions, the pit stop, result status."""
    rec = _records(race, LAP_DATA, frames, s.t)
    rec["time_trial_pb_car"] = rec["time_trial_rival_car"] = 255
    n, car = race.cars, np.arange(race.cars)[None, :]
    d = rec["cars"][:, :n]
    prev = np.maximum(s.lap - 1, 0)
    d["last_lap_ms"] = np.where(
        s.lap >= 1, np.round((race.starts[car, s.lap] - race.starts[car, prev]) * 1000), 0
    )
    d["current_lap_ms"] = np.round(s.elapsed * 1000)
    s1, s2 = SECTORS
    sector1 = np.where(s.x >= s1, race.sector1_s[car, s.lap], 0.0)
    sector2 = np.where(s.x >= s2, race.sector2_s[car, s.lap], 0.0)
    d["sector1_ms"], d["sector1_min"] = _split_ms(sector1)
    d["sector2_ms"], d["sector2_min"] = _split_ms(sector2)
    d["lap_distance"] = s.x
    d["total_distance"] = s.total
    d["car_position"] = s.position
    d["current_lap"] = np.minimum(s.lap + 1, 255)
    d["pit_status"] = np.where(s.in_box, 2, np.where(s.in_lane, 1, 0))
    d["pit_stops"] = s.new_tyres
    d["sector"] = (s.x >= s1).astype(np.uint8) + (s.x >= s2)
    d["grid_position"] = race.grid
    in_lap = (s.t[:, None] >= race.in_lap_start) & (s.t[:, None] < race.box_out)
    out_lap = (s.t[:, None] >= race.box_out) & (s.t[:, None] < race.out_lap_end)
    d["driver_status"] = np.where(in_lap, 2, np.where(out_lap, 3, 4))
    d["result_status"] = np.where(s.finished, 3, 2)
    d["pit_lane_timer_active"] = s.in_lane
    d["pit_lane_time_ms"] = np.where(
        s.in_lane, np.clip((s.t[:, None] - race.lane_in) * 1000, 0, 65_535), 0
    )
    d["pit_stop_timer_ms"] = np.where(
        s.in_box, np.clip((s.t[:, None] - race.box_in) * 1000, 0, 65_535), 0
    )
    d["speed_trap_fastest_lap"] = 255  # none, as the game sends before a speed trap
    return rec


def _wheels(values: np.ndarray) -> np.ndarray:
    """(frames, cars) -> (frames, cars, 4): the same for the four wheels before offsets."""
    return np.repeat(values[:, :, None], 4, axis=2)


def _tyre_temps(race: _Race, s: _State) -> tuple[np.ndarray, np.ndarray]:
    """Surface and inner temperatures (°C): hotter in corners and under braking,
    a little hotter as the tyre ages, softs warmer than mediums."""
    load = np.abs(s.steer) + 0.3 * s.brake
    soft = ~s.new_tyres
    age = _tyre_age(race, s)
    surface = _wheels(86.0 + 30.0 * load + 4.0 * soft + 0.3 * np.minimum(age, 30)) + WHEEL_HEAT
    inner = _wheels(96.0 + 8.0 * load + 3.0 * soft + 0.4 * np.minimum(age, 30)) + WHEEL_HEAT / 2
    return surface, inner


def _tyre_age(race: _Race, s: _State) -> np.ndarray:
    """Laps completed in the stint."""
    done = np.minimum(s.lap, race.laps)
    age: np.ndarray = done - np.where(s.new_tyres, race.pit_lap[None, :], 0)
    return age


def _telemetry(race: _Race, s: _State, frames: np.ndarray) -> np.ndarray:
    """CarTelemetry packets: speed, pedals, gear, rpm, DRS, brakes and tyres."""
    rec = _records(race, CAR_TELEMETRY, frames, s.t)
    rec["mfd_panel"] = rec["mfd_panel_secondary"] = 255  # MFD closed
    d = rec["cars"][:, : race.cars]
    gear, rpm = _gear_rpm(s.speed)
    d["speed"] = s.speed
    d["throttle"] = s.throttle
    d["steer"] = s.steer
    d["brake"] = s.brake
    d["gear"] = gear
    d["engine_rpm"] = np.round(rpm)
    d["drs"] = _drs(s)
    lights = np.clip((rpm - 10_500.0) / 2000.0, 0.0, 1.0)
    d["rev_lights_percent"] = np.round(lights * 100)
    d["rev_lights_bits"] = (1 << np.round(lights * 15).astype(np.int64)) - 1  # 15 LEDs
    brakes = 300.0 + 650.0 * s.brake + 120.0 * np.abs(s.steer)
    d["brakes_temperature"] = _wheels(np.round(brakes)) + np.array([0, 0, 40, 40])
    surface, inner = _tyre_temps(race, s)
    d["tyres_surface_temperature"] = np.round(surface)
    d["tyres_inner_temperature"] = np.round(inner)
    d["engine_temperature"] = np.round(105.0 + 6.0 * s.throttle)
    d["tyres_pressure"] = COLD_PRESSURE_PSI + 0.03 * (inner - 70.0)
    return rec


def _status(race: _Race, s: _State, frames: np.ndarray) -> np.ndarray:
    """CarStatus packets: fuel, tyres (compound, age), limiter, engine and ERS."""
    rec = _records(race, CAR_STATUS, frames, s.t)
    d = rec["cars"][:, : race.cars]
    d["fuel_mix"] = 1  # standard
    d["front_brake_bias"] = 56
    d["pit_limiter"] = s.in_lane
    fuel = np.maximum(race.fuel_start - race.fuel_per_lap * s.total / TRACK_LENGTH, 0.0)
    d["fuel_in_tank"] = fuel
    d["fuel_capacity"] = FUEL_CAPACITY
    d["fuel_remaining_laps"] = fuel / race.fuel_per_lap
    d["max_rpm"] = MAX_RPM
    d["idle_rpm"] = IDLE_RPM
    d["max_gears"] = MAX_GEARS
    d["drs_allowed"] = _drs(s)
    d["visual_compound"] = np.where(s.new_tyres, MEDIUM[0], SOFT[0])
    d["actual_compound"] = np.where(s.new_tyres, MEDIUM[1], SOFT[1])
    d["tyres_age_laps"] = np.clip(_tyre_age(race, s), 0, 255)
    _, rpm = _gear_rpm(s.speed)
    d["engine_power_ice"] = 560e3 * s.throttle * rpm / GEAR_RPM_HI  # W
    d["engine_power_mguk"] = 120e3 * s.throttle * (s.speed > 100)
    d["ers_store_energy"] = 4e6 * (0.55 + 0.35 * np.cos(2 * np.pi * s.x / TRACK_LENGTH))  # J
    d["ers_deploy_mode"] = 1  # medium
    return rec


def _session(race: _Race) -> np.ndarray:
    """The Session packet (one record; header and time left set when sent)."""
    rec = _records(race, SESSION, np.zeros(1, np.int64), np.zeros(1))
    rec["weather"] = 0  # clear
    rec["track_temperature"] = 33
    rec["air_temperature"] = 24
    rec["total_laps"] = race.laps
    rec["track_length"] = TRACK_LENGTH
    rec["session_type"] = SESSION_TYPE_RACE
    rec["track_id"] = TRACK_ID
    rec["session_duration"] = SESSION_DURATION_S
    rec["pit_speed_limit"] = PIT_LIMIT_KMH
    rec["safety_car_status"] = 0
    return rec


def _participants(race: _Race) -> np.ndarray:
    """The Participants packet (one record; header set when sent)."""
    rec = _records(race, PARTICIPANTS, np.zeros(1, np.int64), np.zeros(1))
    n = race.cars
    rec["num_active_cars"] = n
    d = rec["cars"][0, :n]
    names, numbers, drivers, nations = zip(*ROSTER[:n], strict=True)
    teams = np.array(TEAMS)[(np.arange(n) // 2) % len(TEAMS)]
    d["ai_controlled"] = np.arange(n) > 0  # index 0 is the player
    d["driver_id"] = drivers
    d["network_id"] = 255
    d["team_id"] = teams
    d["race_number"] = numbers
    d["nationality"] = nations
    d["name"] = names
    d["your_telemetry"] = 1  # public
    d["platform"] = np.where(np.arange(n) > 0, 255, 1)  # AI: none; the player on Steam
    if race.fmt >= 2025:
        d["num_colours"] = 1
        d["livery_colours"][:, 0] = np.array([TEAM_RGB[int(team)] for team in teams])
    return rec


def _stamped(rec: np.ndarray, frame: int, t: float) -> bytes:
    """A one-record packet sent at a frame: its header brought up to date."""
    rec["header"]["frame"] = rec["header"]["overall_frame"] = frame
    rec["header"]["session_time"] = t
    return rec.tobytes()


def _event(race: _Race, code: bytes, frame: int, t: float) -> bytes:
    """An Event packet (details left zero: SSTA and SEND have none)."""
    rec = _records(race, EVENT, np.array([frame]), np.array([t]))
    rec["code"] = code
    return rec.tobytes()


def _due(frames: np.ndarray, rate_hz: float, every_s: float) -> np.ndarray:
    """Frames that are the first of a new `every_s` period (frame 0 included)."""
    per = rate_hz * every_s
    due: np.ndarray = np.floor(frames / per + 1e-9) != np.floor((frames - 1) / per + 1e-9)
    return due


def _datagrams(race: _Race) -> Iterator[tuple[float, bytes]]:
    """The session in sending order: SSTA; per frame Session (2 Hz) and
    Participants (every 5 s) when due, then Motion, LapData, CarTelemetry,
    CarStatus; SEND with the last frame."""
    session, participants = _session(race), _participants(race)
    batch = max(60, round(race.rate_hz))  # a second of frames (or more) per numpy pass
    yield 0.0, _event(race, b"SSTA", 0, 0.0)
    last_t = 0.0
    for first in range(0, race.frames, batch):
        frames = np.arange(first, min(first + batch, race.frames))
        t = frames / race.rate_hz
        state = _state(race, t)
        per_frame = [
            _split(_records(race, MOTION, frames, t)),
            _split(_lap_data(race, state, frames)),
            _split(_telemetry(race, state, frames)),
            _split(_status(race, state, frames)),
        ]
        session_due = _due(frames, race.rate_hz, SESSION_EVERY_S).tolist()
        participants_due = _due(frames, race.rate_hz, PARTICIPANTS_EVERY_S).tolist()
        for j, (frame, now) in enumerate(zip(frames.tolist(), t.tolist(), strict=True)):
            if session_due[j]:
                session["session_time_left"] = max(0, SESSION_DURATION_S - math.floor(now))
                yield now, _stamped(session, frame, now)
            if participants_due[j]:
                yield now, _stamped(participants, frame, now)
            for datagrams in per_frame:
                yield now, datagrams[j]
            last_t = now
    yield last_t, _event(race, b"SEND", race.frames - 1, last_t)
