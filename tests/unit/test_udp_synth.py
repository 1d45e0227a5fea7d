"""The synthetic game session (`pipeline.sources.udp_synth`): every datagram is a
valid packet of its format, and the race in it holds together (start and end
events, one pit stop per car, positions, plausible ranges). No network, no stack."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from pipeline.sources import udp_packets as packets
from pipeline.sources.udp_synth import TRACK_LENGTH, synthetic_session

CARS, LAPS, RATE_HZ, LAP_S = 4, 2, 10.0, 30.0


@dataclass
class Parsed:
    """A small session, parsed: the datagrams in order and the packets by id."""

    fmt: int
    times: list[float] = field(default_factory=list)
    datagrams: list[bytes] = field(default_factory=list)
    records: list[np.void | None] = field(default_factory=list)
    parser: packets.PacketParser = field(default_factory=packets.PacketParser)

    def of(self, packet_id: int) -> list[np.void]:
        return [
            r for r in self.records if r is not None and int(r["header"]["packet_id"]) == packet_id
        ]

    def cars(self, packet_id: int) -> np.ndarray:
        """(packets, 22) car entries of one packet type."""
        return np.stack([r["cars"] for r in self.of(packet_id)])


def parsed_session(fmt: int, **kwargs: int | float) -> Parsed:
    args: dict[str, int | float] = {
        "cars": CARS, "laps": LAPS, "rate_hz": RATE_HZ, "lap_s": LAP_S, "seed": 7, **kwargs
    }  # fmt: skip
    session = Parsed(fmt)
    for t, datagram in synthetic_session(fmt=fmt, **args):  # type: ignore[arg-type]
        session.times.append(t)
        session.datagrams.append(datagram)
        session.records.append(session.parser.parse(datagram))
    return session


@pytest.fixture(scope="module", params=[2024, 2025], ids=["F1-24", "F1-25"])
def session(request: pytest.FixtureRequest) -> Parsed:
    fmt: int = request.param
    return parsed_session(fmt)


def test_every_datagram_is_a_packet_the_parser_takes(session: Parsed) -> None:
    counts = session.parser.counts
    assert set(counts) == {
        "parsed:Event", "parsed:Session", "parsed:Participants", "parsed:LapData",
        "parsed:CarTelemetry", "parsed:CarStatus", "ignored:Motion",
    }  # fmt: skip
    frames = counts["parsed:LapData"]
    assert counts["ignored:Motion"] == counts["parsed:CarTelemetry"] == frames
    assert counts["parsed:CarStatus"] == frames
    sizes = {(d[6], len(d)) for d in session.datagrams}
    participants = {2024: 1350, 2025: 1284}[session.fmt]
    assert sizes == {
        (0, 1349),
        (1, 753),
        (2, 1285),
        (3, 45),
        (4, participants),
        (6, 1352),
        (7, 1239),
    }
    headers = [r["header"] for r in session.records if r is not None]
    assert {int(h["packet_format"]) for h in headers} == {session.fmt}
    assert {int(h["game_year"]) for h in headers} == {session.fmt - 2000}
    assert len({int(h["session_uid"]) for h in headers}) == 1
    assert {(int(h["player_car"]), int(h["secondary_player_car"])) for h in headers} == {(0, 255)}


def test_time_only_moves_forward_and_each_frame_comes_in_order(session: Parsed) -> None:
    assert session.times[0] == 0.0
    assert all(b >= a for a, b in zip(session.times, session.times[1:], strict=False))
    frames = [packets.header(d) for d in session.datagrams]
    for t, head in zip(session.times, frames, strict=True):
        assert float(head["session_time"]) == pytest.approx(t, abs=1e-4)
    # Per frame: Motion, LapData, CarTelemetry, CarStatus, frame numbers 0, 1, 2, ...
    per_frame = [h for h in frames if int(h["packet_id"]) in (0, 2, 6, 7)]
    ids = [int(h["packet_id"]) for h in per_frame]
    assert ids == [0, 2, 6, 7] * (len(ids) // 4)
    numbers = np.array([int(h["frame"]) for h in per_frame]).reshape(-1, 4)
    assert (numbers == np.arange(len(numbers))[:, None]).all()
    assert (numbers[:, 0] == [int(h["overall_frame"]) for h in per_frame[::4]]).all()
    steps = np.diff([float(h["session_time"]) for h in per_frame[::4]])
    assert steps == pytest.approx(1 / RATE_HZ, abs=1e-4)


def test_session_opens_with_ssta_and_closes_with_send_after_the_flag(session: Parsed) -> None:
    first, last = session.records[0], session.records[-1]
    assert first is not None and last is not None
    assert bytes(first["code"]) == b"SSTA" and bytes(last["code"]) == b"SEND"
    assert [bytes(r["code"]) for r in session.of(packets.EVENT)] == [b"SSTA", b"SEND"]
    laps = session.cars(packets.LAP_DATA)[:, :CARS]
    assert (laps["result_status"][-1] == 3).all()  # everyone finished before SEND
    times = np.array([float(r["header"]["session_time"]) for r in session.of(packets.LAP_DATA)])
    last_finish = times[np.argmax(laps["result_status"] == 3, axis=0)].max()
    assert 0.5 <= session.times[-1] - last_finish <= 3.0


def test_result_status_laps_and_distance(session: Parsed) -> None:
    laps = session.cars(packets.LAP_DATA)[:, :CARS]
    status = laps["result_status"]
    assert set(np.unique(status)) == {2, 3}
    assert (np.diff(status.astype(int), axis=0) >= 0).all()  # active, then finished for good
    finished = status == 3
    assert (laps["current_lap"][~finished] <= LAPS).all()
    assert (laps["current_lap"][~finished][:1] == 1).all()
    assert (laps["total_distance"][finished] >= LAPS * TRACK_LENGTH - 1).all()
    assert (laps["lap_distance"] >= 0).all() and (laps["lap_distance"] <= TRACK_LENGTH).all()
    assert (np.diff(laps["total_distance"], axis=0) >= 0).all()
    assert (laps["current_lap_ms"][laps["current_lap"] > 1] < 3 * LAP_S * 1000).all()
    assert ((laps["last_lap_ms"] > 0) == (laps["current_lap"] > 1)).all()


def test_each_car_pits_once_and_changes_tyres(session: Parsed) -> None:
    laps = session.cars(packets.LAP_DATA)[:, :CARS]
    status = session.cars(packets.CAR_STATUS)[:, :CARS]
    telemetry = session.cars(packets.CAR_TELEMETRY)[:, :CARS]
    for car in range(CARS):
        lap, tyres, tel = laps[:, car], status[:, car], telemetry[:, car]
        stops = lap["pit_stops"].astype(int)
        assert stops[0] == 0 and stops[-1] == 1 and set(np.diff(stops)) <= {0, 1}
        after = stops == 1
        # The pit lane: 1 (pitting), 2 (stationary in the box), 1, then out.
        changes = lap["pit_status"][np.flatnonzero(np.diff(lap["pit_status"].astype(int))) + 1]
        assert changes.tolist() == [1, 2, 1, 0]
        assert (tel["speed"][lap["pit_status"] > 0] <= 81).all()  # the pit limiter
        assert (tel["speed"][lap["pit_status"] == 2] == 0).all()
        assert (tyres["pit_limiter"] == (lap["pit_status"] > 0)).all()
        assert set(tyres["visual_compound"][~after]) == {16}
        assert set(tyres["visual_compound"][after]) == {17}
        assert len(set(tyres["actual_compound"][~after])) == 1
        assert set(tyres["actual_compound"][after]) != set(tyres["actual_compound"][~after])
        assert tyres["tyres_age_laps"][np.argmax(after)] == 0  # new tyres on exit
        assert set(lap["driver_status"]) <= {2, 3, 4} and {2, 3} <= set(lap["driver_status"])
    assert (np.diff(status["fuel_in_tank"], axis=0) <= 0).all()


def test_positions_are_a_permutation_of_the_cars(session: Parsed) -> None:
    laps = session.cars(packets.LAP_DATA)
    positions = np.sort(laps["car_position"][:, :CARS], axis=1)
    assert (positions == np.arange(1, CARS + 1)).all()
    assert sorted(laps["grid_position"][0, :CARS].tolist()) == list(range(1, CARS + 1))


def test_values_stay_in_plausible_ranges(session: Parsed) -> None:
    cars = session.cars(packets.CAR_TELEMETRY)[:, :CARS]
    assert (cars["speed"] <= 360).all() and cars["speed"].max() > 300
    assert (cars["gear"] >= 0).all() and (cars["gear"] <= 8).all()
    for pedal in ("throttle", "brake"):
        assert ((cars[pedal] >= 0) & (cars[pedal] <= 1)).all()
    assert cars["brake"].max() > 0.5 and cars["throttle"].max() == 1.0
    assert (cars["engine_rpm"] >= 4000).all() and (cars["engine_rpm"] <= 13_000).all()
    # Gear rises with speed.
    order = np.argsort(cars["speed"], axis=None)
    assert (np.diff(cars["gear"].ravel()[order].astype(int)) >= 0).all()
    assert set(np.unique(cars["drs"])) == {0, 1}
    assert ((cars["tyres_pressure"] > 18) & (cars["tyres_pressure"] < 30)).all()
    assert ((cars["tyres_inner_temperature"] > 60) & (cars["tyres_inner_temperature"] < 130)).all()


def test_inactive_indexes_stay_zero(session: Parsed) -> None:
    for packet_id in (packets.LAP_DATA, packets.CAR_TELEMETRY, packets.CAR_STATUS):
        idle = session.cars(packet_id)[:, CARS:]
        assert not idle.tobytes().strip(b"\0"), packets.PACKET_NAMES[packet_id]
    assert (session.cars(packets.LAP_DATA)[:, CARS:]["result_status"] == 0).all()
    assert not session.cars(packets.PARTICIPANTS)[:, CARS:].tobytes().strip(b"\0")


def test_participants_name_every_car_once(session: Parsed) -> None:
    every = session.of(packets.PARTICIPANTS)
    assert len(every) == int(session.times[-1] // 5) + 1  # every 5 s from t = 0
    assert all(int(p["num_active_cars"]) == CARS for p in every)
    cars = every[0]["cars"][:CARS]
    assert len(set(cars["race_number"].tolist())) == CARS
    assert all(1 <= n <= 99 for n in cars["race_number"].tolist())
    names = [bytes(n) for n in cars["name"]]
    assert len(set(names)) == CARS and all(n.isupper() for n in names)
    assert cars["ai_controlled"].tolist() == [0] + [1] * (CARS - 1)
    assert ((cars["team_id"] >= 0) & (cars["team_id"] <= 9)).all()
    if session.fmt == 2025:
        assert (cars["num_colours"] == 1).all()
        assert (cars["livery_colours"][:, 0].sum(axis=1) > 0).all()


def test_session_packet_describes_the_race(session: Parsed) -> None:
    every = session.of(packets.SESSION)
    assert len(every) == int(session.times[-1] // 0.5) + 1  # 2 Hz from t = 0
    info = every[0]
    assert int(info["track_id"]) == 11 and int(info["track_length"]) == TRACK_LENGTH
    assert int(info["session_type"]) == 15 and int(info["total_laps"]) == LAPS
    assert int(info["pit_speed_limit"]) == 80 and int(info["safety_car_status"]) == 0
    assert (int(info["air_temperature"]), int(info["track_temperature"])) == (24, 33)
    left = [int(p["session_time_left"]) for p in every]
    assert left == sorted(left, reverse=True) and left[0] == int(info["session_duration"])


def test_twenty_two_cars_at_sixty_hertz_send_what_the_game_sends_per_second() -> None:
    counts: dict[int, int] = {}
    for t, _ in synthetic_session(fmt=2025, cars=22, laps=1, rate_hz=60.0, lap_s=20.0):
        counts[int(t)] = counts.get(int(t), 0) + 1
    # 60 frames of 4 packets, 2 Session packets, Participants in seconds 0, 5, ...
    assert counts[1] == 60 * 4 + 2 and counts[5] == 60 * 4 + 2 + 1


def test_a_seed_gives_the_same_session_and_another_seed_another() -> None:
    def digest(**kwargs: int) -> bytes:
        return b"".join(d for _, d in synthetic_session(cars=3, laps=2, rate_hz=5.0, **kwargs))

    assert digest(seed=1) == digest(seed=1)
    assert digest(seed=1) != digest(seed=2)
    _, first = next(synthetic_session(session_uid=12345))
    assert int(packets.header(first)["session_uid"]) == 12345


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fmt": 2023}, {"fmt": 2026}, {"cars": 0}, {"cars": 23}, {"laps": 0},
        {"rate_hz": 0.0}, {"rate_hz": -1.0}, {"rate_hz": 121.0}, {"lap_s": 0.0},
        {"session_uid": 0},
    ],
    ids=lambda kwargs: ",".join(f"{k}={v}" for k, v in kwargs.items()),
)  # fmt: skip
def test_invalid_arguments_are_refused_at_the_call(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        synthetic_session(**kwargs)  # type: ignore[arg-type]
