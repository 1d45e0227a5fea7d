"""The game's parsed packets as runs of `TelemetrySample`s (source `f1-udp`).

One game session (one `sessionUID`) is one run. Its CarTelemetry packets become
one sample per car in the session, joined with the latest LapData (lap,
position, pit status), CarStatus (compound, tyre age), Session (track, session
type, safety car) and Participants (name, race number) the game had sent by
then, so every value is one the feed had delivered at the sample's time.

- **Session key**: `F1-24_Monza_TimeTrial_<uid hex>`: the game, track and session
  type for people, the UID for uniqueness.
- **Event time**: the packet's session time anchored to the wall clock at the
  session's first packet (the game sends no wall clock).
- **Cars**: a car is in the session while its LapData result status is active
  or finished (indexes the game fills with zeros, time-trial ghosts, retired
  cars are skipped). Its `driver_number` is its race number; a number another
  car of the run already holds (in time trial the ghosts share the player's)
  becomes 100 + the car's index. A car keeps its number for the whole run.
- **Units** as on the FastF1 path: throttle and brake 0-100 %, speed km/h.
- **Runs**: a run starts once the session's Session and Participants packets
  have arrived (they name the run and its drivers; the telemetry that came
  before them, at most `PENDING_KEPT` packets, is kept and sent then). A run
  ends on the Event `SEND`, on a new session UID, on an `SSTA` of its own
  session (restarted, or a recording sent again), or when the listener stops;
  its end markers close the windows, and `verify` works as for a replay.
- A flashback rewinds the game's session time: the samples after it carry
  earlier event times and new seqs; windows already closed mark them late.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline import schema
from pipeline.kafka.producer import new_run_id
from pipeline.sources import udp_packets as packets

SOURCE = "f1-udp"
PENDING_KEPT = 600  # telemetry packets held before the session is named (10 s at 60 Hz)

TRACKS = {
    0: "Melbourne", 1: "PaulRicard", 2: "Shanghai", 3: "Sakhir", 4: "Catalunya", 5: "Monaco",
    6: "Montreal", 7: "Silverstone", 8: "Hockenheim", 9: "Hungaroring", 10: "Spa", 11: "Monza",
    12: "Singapore", 13: "Suzuka", 14: "AbuDhabi", 15: "Texas", 16: "Brazil", 17: "Austria",
    18: "Sochi", 19: "Mexico", 20: "Baku", 21: "SakhirShort", 22: "SilverstoneShort",
    23: "TexasShort", 24: "SuzukaShort", 25: "Hanoi", 26: "Zandvoort", 27: "Imola",
    28: "Portimao", 29: "Jeddah", 30: "Miami", 31: "LasVegas", 32: "Losail",
    39: "SilverstoneReverse", 40: "AustriaReverse", 41: "ZandvoortReverse",
}  # fmt: skip
SESSION_TYPES = {
    0: "Unknown", 1: "P1", 2: "P2", 3: "P3", 4: "ShortP", 5: "Q1", 6: "Q2", 7: "Q3",
    8: "ShortQ", 9: "OSQ", 10: "SprintShootout1", 11: "SprintShootout2",
    12: "SprintShootout3", 13: "ShortSprintShootout", 14: "OneShotSprintShootout",
    15: "Race", 16: "Race2", 17: "Race3", 18: "TimeTrial",
}  # fmt: skip
# CarStatus visual compound -> FastF1's names (the models were trained on those).
COMPOUNDS = {16: "SOFT", 17: "MEDIUM", 18: "HARD", 7: "INTERMEDIATE", 8: "WET"}
# Session safety car status -> FastF1 track status codes (1 green, 4 SC, 6 VSC).
TRACK_STATUS = {0: "1", 1: "4", 2: "6", 3: "1"}
IN_SESSION = (2, 3)  # LapData result status: active, finished


@dataclass(frozen=True)
class GameRun:
    run_id: str
    session_key: str
    session_uid: int
    packet_format: int
    track: str
    session_type: str


@dataclass(frozen=True)
class RunStarted:
    run: GameRun


@dataclass(frozen=True)
class SamplesReady:
    run: GameRun
    samples: list[schema.TelemetrySample]
    received_us: int  # when the telemetry packet arrived


@dataclass(frozen=True)
class RunEnded:
    run: GameRun
    reason: str


FeedEvent = RunStarted | SamplesReady | RunEnded


@dataclass
class _Session:
    uid: int
    packet_format: int
    anchor_us: int  # wall clock at session time 0
    info: np.void | None = None
    participants: np.void | None = None
    lap: np.void | None = None
    status: np.void | None = None
    run: GameRun | None = None
    numbers: np.ndarray = field(default_factory=lambda: np.full(packets.CARS, -1, np.int64))
    seq: np.ndarray = field(default_factory=lambda: np.zeros(packets.CARS, np.int64))
    pending: deque[tuple[np.void, np.void | None, np.void | None, int]] = field(
        default_factory=deque
    )


class GameFeed:
    """Feed parsed packets in arrival order; get back what happened to the runs.

    `counts` says what became of packets that made no sample: `outside_session`
    (session UID 0: the game's menus), `after_session_end`, `pending_dropped`
    (telemetry before the session was named, beyond PENDING_KEPT), and the
    Event codes seen (`event:SSTA`, ...).
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._session: _Session | None = None
        self._ended: set[int] = set()

    def handle(self, packet: np.void, received_us: int) -> list[FeedEvent]:
        head = packet["header"]
        uid = int(head["session_uid"])
        if uid == 0:
            self.counts["outside_session"] += 1
            return []
        events: list[FeedEvent] = []
        session = self._session
        restart = int(head["packet_id"]) == packets.EVENT and packets.as_code(packet) == "SSTA"
        if restart:  # the session (re)starts: a restarted session, a recording sent again
            self._ended.discard(uid)
            if session is not None and session.uid == uid and session.run is not None:
                events += self._end(session, "the session started again (SSTA)")
                self._ended.discard(uid)
                session = None
        if uid in self._ended:
            self.counts["after_session_end"] += 1
            return events
        if session is None or session.uid != uid:
            if session is not None:
                events += self._end(session, "a new session began")
            anchor = received_us - round(float(head["session_time"]) * 1e6)
            session = self._session = _Session(uid, int(head["packet_format"]), anchor)
        packet_id = int(head["packet_id"])
        if packet_id == packets.SESSION:
            session.info = packet
        elif packet_id == packets.PARTICIPANTS:
            session.participants = packet
        elif packet_id == packets.LAP_DATA:
            session.lap = packet
        elif packet_id == packets.CAR_STATUS:
            session.status = packet
        elif packet_id == packets.EVENT:
            code = packets.as_code(packet)
            self.counts[f"event:{code}"] += 1
            if code == "SEND":
                events += self._end(session, "the game ended the session (SEND)")
        elif packet_id == packets.CAR_TELEMETRY:
            events += self._telemetry(session, packet, received_us)
        return events

    def close(self, reason: str = "the listener stopped") -> list[FeedEvent]:
        """End the open run (if any)."""
        return self._end(self._session, reason) if self._session is not None else []

    def _end(self, session: _Session, reason: str) -> list[FeedEvent]:
        self._ended.add(session.uid)
        self._session = None
        if session.pending:
            self.counts["pending_dropped"] += len(session.pending)
        return [RunEnded(session.run, reason)] if session.run is not None else []

    def _telemetry(self, session: _Session, packet: np.void, received_us: int) -> list[FeedEvent]:
        session.pending.append((packet, session.lap, session.status, received_us))
        events: list[FeedEvent] = []
        if session.run is None:
            if session.info is None or session.participants is None:
                if len(session.pending) > PENDING_KEPT:
                    session.pending.popleft()
                    self.counts["pending_dropped"] += 1
                return events
            session.run = _name_run(session)
            events.append(RunStarted(session.run))
        while session.pending:
            telemetry, lap, status, received = session.pending.popleft()
            samples = _samples(session, telemetry, lap, status, self.counts)
            if samples:
                events.append(SamplesReady(session.run, samples, received))
        return events


def _name_run(session: _Session) -> GameRun:
    assert session.info is not None
    head = session.info["header"]
    track = TRACKS.get(int(session.info["track_id"]), f"Track{int(session.info['track_id'])}")
    kind = SESSION_TYPES.get(int(session.info["session_type"]), "Unknown")
    key = f"F1-{int(head['game_year'])}_{track}_{kind}_{session.uid:016x}"
    return GameRun(new_run_id(key), key, session.uid, session.packet_format, track, kind)


def _assign_numbers(session: _Session, cars: np.ndarray) -> None:
    """Give cars seen for the first time their race number (or 100 + index when
    another car of the run already holds it). Runs once per car and run."""
    assert session.participants is not None
    taken = set(session.numbers[session.numbers >= 0].tolist())
    race_numbers = session.participants["cars"]["race_number"]
    for index in cars[session.numbers[cars] < 0].tolist():
        number = int(race_numbers[index])
        session.numbers[index] = number if number not in taken else 100 + index
        taken.add(int(session.numbers[index]))


def _within_schema(cars: np.ndarray) -> np.ndarray:
    """Cars whose values the schema can carry. A game never sends others, but a
    datagram of the right size can hold anything (a fuzzer, a broken tool)."""
    pedals = np.stack([cars["throttle"], cars["brake"]])
    usable: np.ndarray = (
        (cars["speed"] <= 1_000) & (cars["engine_rpm"] <= 30_000) & (cars["gear"] >= -1)
        & np.isfinite(pedals).all(axis=0) & (pedals >= 0).all(axis=0) & (pedals <= 2.55).all(axis=0)
    )  # fmt: skip
    return usable


def _samples(
    session: _Session,
    telemetry: np.void,
    lap: np.void | None,
    status: np.void | None,
    counts: Counter[str],
) -> list[schema.TelemetrySample]:
    """One packet's cars in the session as samples, computed column-wise."""
    assert session.run is not None and session.participants is not None
    if lap is not None:
        in_session = np.isin(lap["cars"]["result_status"], IN_SESSION)
    else:  # no LapData yet: the participants the game counts
        in_session = np.arange(packets.CARS) < int(session.participants["num_active_cars"])
    usable = _within_schema(telemetry["cars"])
    if (in_session & ~usable).any():
        counts["car_out_of_bounds"] += int((in_session & ~usable).sum())
    cars = np.flatnonzero(in_session & usable)
    if not len(cars):
        return []
    _assign_numbers(session, cars)
    car = telemetry["cars"][cars]
    session_time = float(telemetry["header"]["session_time"])
    date_us = session.anchor_us + round(session_time * 1e6)
    names = session.participants["cars"]["name"][cars]
    drivers = [schema.as_text(n) or f"CAR{i}" for n, i in zip(names, cars.tolist(), strict=True)]
    seqs = session.seq[cars].tolist()
    session.seq[cars] += 1
    columns: dict[str, list[Any]] = {
        "driver_number": session.numbers[cars].tolist(),
        "driver": drivers,
        "seq": seqs,
        "speed": car["speed"].astype(float).tolist(),
        "rpm": car["engine_rpm"].astype(float).tolist(),
        "gear": car["gear"].tolist(),
        "throttle": (car["throttle"].astype(float) * 100).round(2).tolist(),
        "brake": (car["brake"].astype(float) * 100).round(2).tolist(),
        "drs": car["drs"].tolist(),
        "drs_open": (car["drs"] == 1).tolist(),
    }
    if lap is not None:
        laps = lap["cars"][cars]
        columns["lap_number"] = [n or None for n in laps["current_lap"].tolist()]
        columns["position"] = [p or None for p in laps["car_position"].tolist()]
        columns["stint"] = (laps["pit_stops"].astype(np.int64) + 1).tolist()
        columns["is_in_lap"] = ((laps["pit_status"] > 0) | (laps["driver_status"] == 2)).tolist()
        columns["is_out_lap"] = (laps["driver_status"] == 3).tolist()
        last_lap = laps["last_lap_ms"].astype(float) / 1000
        columns["last_lap_s"] = [t or None for t in last_lap.tolist()]  # 0: no lap done yet
        gap = laps["delta_front_min"].astype(float) * 60 + laps["delta_front_ms"] / 1000
        leader = laps["car_position"] <= 1
        columns["gap_ahead_s"] = [
            None if first else g for g, first in zip(gap.tolist(), leader.tolist(), strict=True)
        ]
    if status is not None:
        tyres = status["cars"][cars]
        columns["compound"] = [COMPOUNDS.get(c) for c in tyres["visual_compound"].tolist()]
        columns["tyre_life"] = tyres["tyres_age_laps"].astype(float).tolist()
    info = session.info
    common: dict[str, Any] = {
        "v": schema.SCHEMA_VERSION,
        "run_id": session.run.run_id,
        "session_key": session.run.session_key,
        "date_us": date_us,
        "session_time_s": session_time,
        "track_status": TRACK_STATUS.get(int(info["safety_car_status"])) if info else None,
        "race_laps": int(info["total_laps"]) or None if info else None,
    }
    names = list(columns)
    return [
        schema.TelemetrySample(**common, **dict(zip(names, values, strict=True)))
        for values in zip(*columns.values(), strict=True)
    ]
