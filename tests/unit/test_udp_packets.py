"""The game's UDP packets: the real F1 24 recording parses completely with the
values its README gives; malformed datagrams are counted, never raised; the
feed maps packets onto runs of samples in the one schema."""

from __future__ import annotations

import itertools
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline import schema
from pipeline.settings import get_settings
from pipeline.sources import udp_feed, udp_packets
from pipeline.sources.udp_recording import (
    RecordingDamaged,
    datagram_source,
    parse_address,
    read_recording,
    write_recording,
)
from pipeline.sources.udp_synth import synthetic_session

# The README of ../shared/data/f1-udp: datagrams per packet id.
README_COUNTS = {
    0: 91, 1: 9, 2: 143, 3: 4, 4: 1, 5: 8, 6: 57, 7: 38, 10: 23, 11: 48, 12: 30, 13: 73, 14: 1,
}  # fmt: skip


@pytest.fixture(scope="module")
def recording() -> list[tuple[float, bytes]]:
    path = get_settings().udp_recording
    if not path.exists():
        pytest.skip(f"the F1 24 recording is not at {path}")
    return list(read_recording(path))


def _feed(datagrams: list[tuple[float, bytes]]) -> tuple[list[udp_feed.FeedEvent], Counter[str]]:
    parser, feed = udp_packets.PacketParser(), udp_feed.GameFeed()
    events: list[udp_feed.FeedEvent] = []
    for t, datagram in datagrams:
        packet = parser.parse(datagram)
        if packet is not None:
            events += feed.handle(packet, 1_800_000_000_000_000 + round(t * 1e6))
    return events + feed.close(), parser.counts + feed.counts


def _samples(events: list[udp_feed.FeedEvent]) -> list[schema.TelemetrySample]:
    return [s for e in events if isinstance(e, udp_feed.SamplesReady) for s in e.samples]


def test_the_real_recording_parses_completely(recording: list[tuple[float, bytes]]) -> None:
    parser = udp_packets.PacketParser()
    packets = [parser.parse(d) for _, d in recording]
    by_id = Counter(d[6] for _, d in recording)
    assert dict(by_id) == README_COUNTS
    mapped = {udp_packets.PACKET_NAMES[i] for i in (1, 2, 3, 4, 6, 7)}
    assert parser.counts == Counter(
        {f"{'parsed' if udp_packets.PACKET_NAMES[i] in mapped else 'ignored'}:"
         f"{udp_packets.PACKET_NAMES[i]}": n for i, n in README_COUNTS.items()}
    )  # fmt: skip
    session = next(p for p in packets if p is not None and p["header"]["packet_id"] == 1)
    assert (int(session["track_id"]), int(session["track_length"])) == (11, 5798)
    assert int(session["session_type"]) == 18  # time trial
    assert (int(session["air_temperature"]), int(session["track_temperature"])) == (27, 42)
    assert int(session["header"]["packet_format"]) == 2024


def test_the_player_cars_values_match_the_readme(recording: list[tuple[float, bytes]]) -> None:
    parser = udp_packets.PacketParser()
    telemetry = [p for _, d in recording if (p := parser.parse(d)) is not None
                 and p["header"]["packet_id"] == udp_packets.CAR_TELEMETRY]  # fmt: skip
    player = np.array([p["cars"][0] for p in telemetry])
    assert player["engine_rpm"][0] == 3429 and player["speed"][0] == 0  # idle
    peak = player[player["speed"].argmax()]
    assert (peak["speed"], peak["gear"], peak["drs"]) == (346, 8, 1)
    braking = player[np.isclose(player["brake"], 0.9, atol=0.005)]
    assert 317 in braking["speed"]
    # ... and the braking zone ends at 119 km/h in 3rd, before the chicane.
    zone = player[np.flatnonzero(player["speed"] == 317)[0] :][:8]
    assert (119, 3) in {(int(c["speed"]), int(c["gear"])) for c in zone}


def test_the_recording_maps_onto_one_run_of_the_player(
    recording: list[tuple[float, bytes]],
) -> None:
    events, counts = _feed(recording)
    assert isinstance(events[0], udp_feed.RunStarted)
    # The recording stops before the game's SEND: the listener's stop ends the run.
    assert isinstance(events[-1], udp_feed.RunEnded)
    assert events[-1].reason == "the listener stopped"
    run = events[0].run
    assert run.session_key == "F1-24_Monza_TimeTrial_584188aedce30276"
    samples = _samples(events)
    # Every CarTelemetry packet gives the player's sample; the ghost (index 1,
    # result status 0) is not in the session and is skipped.
    assert len(samples) == 57 and {s.driver_number for s in samples} == {5}
    assert [s.seq for s in samples] == list(range(57))
    assert {s.session_key for s in samples} == {run.session_key}
    assert max(s.speed for s in samples) == 346
    assert all(0 <= s.throttle <= 100 and 0 <= s.brake <= 100 for s in samples)
    assert any(abs(s.brake - 90) < 0.5 for s in samples)  # 0.90 of the pedal, in percent
    assert all(a.date_us < b.date_us for a, b in itertools.pairwise(samples))
    # event time = session time on the wall clock of the session's first packet
    first = samples[0]
    assert first.date_us - round(first.session_time_s * 1e6) == 1_800_000_000_216_464
    assert {s.compound for s in samples[5:]} == {"SOFT"}
    assert counts["event:SSTA"] == 1 and counts["event:BUTN"] == 3
    for sample in samples:  # every sample survives the consumer's typed decode
        assert schema.decode(schema.encode(sample)) == sample


def _header(fmt: int, packet_id: int, uid: int = 7, session_time: float = 1.0) -> bytes:
    return struct.pack("<HBBBBBQfIIBB", fmt, fmt - 2000, 1, 0, 1, packet_id, uid,
                       session_time, 1, 1, 0, 255)  # fmt: skip


def test_malformed_datagrams_are_counted_by_reason_never_raised() -> None:
    rng = np.random.default_rng(11)
    parser, feed = udp_packets.PacketParser(), udp_feed.GameFeed()
    sent: list[bytes] = []
    sent += [rng.bytes(int(n)) for n in rng.integers(0, 2000, 300)]  # random bytes
    sent += [_header(2025, 6)[: int(n)] for n in rng.integers(0, 29, 50)]  # truncated headers
    sent += [_header(2024, 6) + bytes(100)] * 20  # CarTelemetry of the wrong size
    sent += [_header(2023, 6) + bytes(1323)] * 20  # F1 23: unknown format
    sent += [_header(2025, 99) + bytes(500)] * 500  # a flood of unknown ids
    sent += [_header(2025, 6, session_time=float("nan")) + bytes(1323)] * 5
    sent += [_header(2025, 0) + bytes(1320)] * 30  # Motion: known, not mapped
    for datagram in sent:
        packet = parser.parse(datagram)
        if packet is not None:
            feed.handle(packet, 1_800_000_000_000_000)
    counts = parser.counts
    assert counts["unknown_id"] >= 500 and counts["unknown_format"] >= 20
    assert counts["wrong_size:CarTelemetry"] >= 20 and counts["too_short"] >= 50
    assert counts["bad_session_time"] == 5 and counts["ignored:Motion"] >= 30
    assert sum(counts.values()) == len(sent)  # each datagram counted exactly once


def test_values_the_schema_cannot_carry_are_counted_not_sent() -> None:
    session = list(synthetic_session(fmt=2025, cars=3, laps=1, rate_hz=5, lap_s=20))
    broken = []
    for t, datagram in session:
        if datagram[6] == udp_packets.CAR_TELEMETRY:
            packet = np.frombuffer(datagram, udp_packets.PACKETS[(2025, 6)]).copy()
            packet["cars"]["throttle"][0, 1] = np.nan
            packet["cars"]["speed"][0, 2] = 60_000
            datagram = packet.tobytes()
        broken.append((t, datagram))
    events, counts = _feed(broken)
    samples = _samples(events)
    assert {s.driver_number for s in samples} == {_race_number(session, 0)}
    telemetry = sum(1 for _, d in session if d[6] == udp_packets.CAR_TELEMETRY)
    assert counts["car_out_of_bounds"] == 2 * telemetry - counts["pending_dropped"] * 3


def _race_number(session: list[tuple[float, bytes]], index: int) -> int:
    participants = next(d for _, d in session if d[6] == udp_packets.PARTICIPANTS)
    packet = np.frombuffer(participants, udp_packets.PACKETS[(2025, 4)])[0]
    return int(packet["cars"]["race_number"][index])


@pytest.mark.parametrize("fmt", [2024, 2025])
def test_a_synthetic_session_is_one_complete_run(fmt: int) -> None:
    events, counts = _feed(list(synthetic_session(fmt=fmt, cars=22, laps=2, rate_hz=5, lap_s=30)))
    starts = [e for e in events if isinstance(e, udp_feed.RunStarted)]
    assert len(starts) == 1 and starts[0].run.session_key.startswith(f"F1-{fmt - 2000}_Monza_Race")
    assert isinstance(events[-1], udp_feed.RunEnded) and "SEND" in events[-1].reason
    samples = _samples(events)
    cars = {s.driver_number for s in samples}
    assert len(cars) == 22
    per_car = Counter(s.driver_number for s in samples)
    assert len(set(per_car.values())) == 1  # every car in every frame
    assert {s.compound for s in samples} >= {"SOFT", "MEDIUM"}  # the pit stops
    assert any(s.is_in_lap for s in samples) and any(s.is_out_lap for s in samples)
    assert max(s.stint or 0 for s in samples) == 2
    assert counts["pending_dropped"] == 0


def test_a_new_session_uid_ends_the_run_and_starts_another() -> None:
    first = list(synthetic_session(fmt=2025, cars=2, laps=1, rate_hz=5, lap_s=20, seed=1))
    second = list(synthetic_session(fmt=2025, cars=2, laps=1, rate_hz=5, lap_s=20, seed=2))
    cut = first[: len(first) // 2]  # the first session never sends SEND
    events, counts = _feed(cut + second + cut[-10:])
    ends = [e for e in events if isinstance(e, udp_feed.RunEnded)]
    assert [e.reason for e in ends] == ["a new session began", "the game ended the session (SEND)"]
    late = [d for _, d in cut[-10:] if udp_packets.PacketParser().parse(d) is not None]
    assert counts["after_session_end"] == len(late) > 0  # the ended session's late packets


def test_a_session_started_again_is_a_new_run(recording: list[tuple[float, bytes]]) -> None:
    # The recording sent twice (same session UID; it never sends SEND): SSTA ends the
    # first run, the second is a run of its own with seqs and event times from the start.
    events, _ = _feed(recording + recording)
    starts = [e.run for e in events if isinstance(e, udp_feed.RunStarted)]
    ends = [e.reason for e in events if isinstance(e, udp_feed.RunEnded)]
    assert len(starts) == 2 and starts[0].session_key == starts[1].session_key
    assert ends == ["the session started again (SSTA)", "the listener stopped"]
    second = [s for s in _samples(events) if s.run_id == starts[1].run_id]
    assert [s.seq for s in second] == list(range(57))


def test_recordings_round_trip_and_damage_is_one_clear_error(tmp_path: Path) -> None:
    datagrams = list(synthetic_session(fmt=2024, cars=2, laps=1, rate_hz=5, lap_s=20))
    path = tmp_path / "session.bin"
    assert write_recording(path, datagrams) == len(datagrams)
    assert int.from_bytes(path.read_bytes()[:4], "little") == len(datagrams)
    back = list(read_recording(path))
    assert [d for _, d in back] == [d for _, d in datagrams]
    assert np.allclose([t for t, _ in back], [t for t, _ in datagrams])
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(RecordingDamaged, match="cut short"):
        list(read_recording(path))
    path.write_bytes(b"\x01\x00\x00\x00" + struct.pack("<fI", 0.0, 10**9))
    with pytest.raises(RecordingDamaged, match="not a recording"):
        list(read_recording(path))
    with pytest.raises(FileNotFoundError, match="no recording"):
        datagram_source(str(tmp_path / "missing.bin"))
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_address("20777")
