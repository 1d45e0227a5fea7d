"""The F1 game's UDP packets (F1 24 and F1 25 formats) as numpy structured dtypes.

A datagram is parsed whole, in C: `np.frombuffer` over the bytes with the
packet's dtype gives every car's fields as arrays at once, never field by field
per car in Python. The format is chosen by the header's `packetFormat`.

Why our own dtypes rather than a PyPI parser: `f1-packets` (2026.1.1, the
well-kept one) describes one format only, the newest game's, with ctypes
structures decoded per car; we must read F1 24 and F1 25 side by side (the
real recording is F1 24) and parse whole packets as arrays.

Layouts follow EA's published "F1 24/F1 25 UDP specification" structs
(little-endian, packed). Only the packets the platform maps are described
field by field; the others are counted by name and skipped. Every parsed
packet's size is checked against its format: a datagram that is too short,
of the wrong size, of an unknown format or id is counted with its reason and
skipped (`PacketParser.counts`), never raised.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

FORMATS = (2024, 2025)
CARS = 22

MOTION, SESSION, LAP_DATA, EVENT, PARTICIPANTS = 0, 1, 2, 3, 4
CAR_TELEMETRY, CAR_STATUS = 6, 7
PACKET_NAMES = {
    0: "Motion", 1: "Session", 2: "LapData", 3: "Event", 4: "Participants",
    5: "CarSetups", 6: "CarTelemetry", 7: "CarStatus", 8: "FinalClassification",
    9: "LobbyInfo", 10: "CarDamage", 11: "SessionHistory", 12: "TyreSets",
    13: "MotionEx", 14: "TimeTrial", 15: "LapPositions",
}  # fmt: skip
# The highest packet id each format defines (F1 25 added LapPositions).
LAST_ID = {2024: 14, 2025: 15}

u1, i1, u2, u4, u8, f4 = "<u1", "<i1", "<u2", "<u4", "<u8", "<f4"

HEADER = np.dtype([
    ("packet_format", u2), ("game_year", u1), ("game_major", u1), ("game_minor", u1),
    ("packet_version", u1), ("packet_id", u1), ("session_uid", u8), ("session_time", f4),
    ("frame", u4), ("overall_frame", u4), ("player_car", u1), ("secondary_player_car", u1),
])  # fmt: skip
assert HEADER.itemsize == 29

CAR_TELEMETRY_DATA = np.dtype([
    ("speed", u2), ("throttle", f4), ("steer", f4), ("brake", f4), ("clutch", u1),
    ("gear", i1), ("engine_rpm", u2), ("drs", u1), ("rev_lights_percent", u1),
    ("rev_lights_bits", u2), ("brakes_temperature", u2, 4),
    ("tyres_surface_temperature", u1, 4), ("tyres_inner_temperature", u1, 4),
    ("engine_temperature", u2), ("tyres_pressure", f4, 4), ("surface_type", u1, 4),
])  # fmt: skip
assert CAR_TELEMETRY_DATA.itemsize == 60

LAP_DATA_ENTRY = np.dtype([
    ("last_lap_ms", u4), ("current_lap_ms", u4), ("sector1_ms", u2), ("sector1_min", u1),
    ("sector2_ms", u2), ("sector2_min", u1), ("delta_front_ms", u2), ("delta_front_min", u1),
    ("delta_leader_ms", u2), ("delta_leader_min", u1), ("lap_distance", f4),
    ("total_distance", f4), ("safety_car_delta", f4), ("car_position", u1),
    ("current_lap", u1), ("pit_status", u1), ("pit_stops", u1), ("sector", u1),
    ("lap_invalid", u1), ("penalties", u1), ("warnings", u1), ("corner_cutting_warnings", u1),
    ("unserved_drive_throughs", u1), ("unserved_stop_gos", u1), ("grid_position", u1),
    ("driver_status", u1), ("result_status", u1), ("pit_lane_timer_active", u1),
    ("pit_lane_time_ms", u2), ("pit_stop_timer_ms", u2), ("pit_stop_should_serve_pen", u1),
    ("speed_trap_fastest", f4), ("speed_trap_fastest_lap", u1),
])  # fmt: skip
assert LAP_DATA_ENTRY.itemsize == 57

CAR_STATUS_DATA = np.dtype([
    ("traction_control", u1), ("anti_lock_brakes", u1), ("fuel_mix", u1),
    ("front_brake_bias", u1), ("pit_limiter", u1), ("fuel_in_tank", f4),
    ("fuel_capacity", f4), ("fuel_remaining_laps", f4), ("max_rpm", u2), ("idle_rpm", u2),
    ("max_gears", u1), ("drs_allowed", u1), ("drs_activation_distance", u2),
    ("actual_compound", u1), ("visual_compound", u1), ("tyres_age_laps", u1),
    ("fia_flags", i1), ("engine_power_ice", f4), ("engine_power_mguk", f4),
    ("ers_store_energy", f4), ("ers_deploy_mode", u1), ("ers_harvested_mguk", f4),
    ("ers_harvested_mguh", f4), ("ers_deployed", f4), ("network_paused", u1),
])  # fmt: skip
assert CAR_STATUS_DATA.itemsize == 55


def _participant(name_bytes: int, liveries: bool) -> np.dtype:
    fields: list[Any] = [
        ("ai_controlled", u1), ("driver_id", u1), ("network_id", u1), ("team_id", u1),
        ("my_team", u1), ("race_number", u1), ("nationality", u1), ("name", f"S{name_bytes}"),
        ("your_telemetry", u1), ("show_online_names", u1), ("tech_level", u2), ("platform", u1),
    ]  # fmt: skip
    if liveries:  # F1 25: names shrink to 32 bytes, livery colours (RGB) added
        fields += [("num_colours", u1), ("livery_colours", u1, (4, 3))]
    return np.dtype(fields)


# The Session packet's leading fields (all we map); the rest of its 753 bytes
# (forecast samples, assists, weekend structure) is kept as opaque bytes.
SESSION_LEAD: list[Any] = [
    ("weather", u1), ("track_temperature", i1), ("air_temperature", i1), ("total_laps", u1),
    ("track_length", u2), ("session_type", u1), ("track_id", i1), ("formula", u1),
    ("session_time_left", u2), ("session_duration", u2), ("pit_speed_limit", u1),
    ("game_paused", u1), ("is_spectating", u1), ("spectator_car", u1),
    ("sli_pro_native_support", u1), ("num_marshal_zones", u1),
    ("marshal_zones", [("zone_start", f4), ("zone_flag", i1)], 21),
    ("safety_car_status", u1), ("network_game", u1),
]  # fmt: skip
SESSION_SIZE = 753

EVENT_SIZE = 45


def _packet(body: list[Any], size: int | None = None) -> np.dtype:
    """A whole packet: the header, then `body`, padded to `size` when given."""
    fields: list[Any] = [("header", HEADER), *body]
    if size is not None:
        used = np.dtype(fields).itemsize
        fields.append(("rest", "V" + str(size - used)))
    return np.dtype(fields)


def _formats() -> dict[tuple[int, int], np.dtype]:
    # fmt: off
    common = {
        SESSION: _packet(SESSION_LEAD, SESSION_SIZE),
        LAP_DATA: _packet(
            [("cars", LAP_DATA_ENTRY, CARS), ("time_trial_pb_car", u1),
             ("time_trial_rival_car", u1)]
        ),
        EVENT: _packet([("code", "S4"), ("details", "V12")]),
        CAR_TELEMETRY: _packet(
            [("cars", CAR_TELEMETRY_DATA, CARS), ("mfd_panel", u1),
             ("mfd_panel_secondary", u1), ("suggested_gear", i1)]
        ),
        CAR_STATUS: _packet([("cars", CAR_STATUS_DATA, CARS)]),
    }
    # fmt: on
    participants = {
        2024: _packet([("num_active_cars", u1), ("cars", _participant(48, False), CARS)]),
        2025: _packet([("num_active_cars", u1), ("cars", _participant(32, True), CARS)]),
    }
    return {
        (fmt, pid): dtype
        for fmt in FORMATS
        for pid, dtype in {**common, PARTICIPANTS: participants[fmt]}.items()
    }


PACKETS = _formats()
# Sizes the specification gives, checked once at import (a typo in a layout fails here).
_EXPECTED_SIZES = {
    (2024, SESSION): 753, (2025, SESSION): 753, (2024, LAP_DATA): 1285, (2025, LAP_DATA): 1285,
    (2024, EVENT): 45, (2025, EVENT): 45, (2024, PARTICIPANTS): 1350, (2025, PARTICIPANTS): 1284,
    (2024, CAR_TELEMETRY): 1352, (2025, CAR_TELEMETRY): 1352,
    (2024, CAR_STATUS): 1239, (2025, CAR_STATUS): 1239,
}  # fmt: skip
assert {key: dtype.itemsize for key, dtype in PACKETS.items()} == _EXPECTED_SIZES

# Event details (a union in the spec) for the codes the feed reads.
EVENT_DETAILS = {
    b"RTMT": np.dtype([("vehicle", u1), ("reason", u1)]),
    b"PENA": np.dtype([
        ("penalty_type", u1), ("infringement_type", u1), ("vehicle", u1), ("other_vehicle", u1),
        ("time", u1), ("lap", u1), ("places_gained", u1),
    ]),
    b"FLBK": np.dtype([("frame", u4), ("session_time", f4)]),
}  # fmt: skip


class PacketParser:
    """Parses datagrams; counts every one by what became of it.

    `counts` keys: `parsed:<Packet>`, `ignored:<Packet>` (a known id the
    platform does not map), and the skip reasons `too_short`,
    `unknown_format`, `unknown_id`, `wrong_size:<Packet>`, `bad_session_time`
    (not a number, or beyond a week).
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def parse(self, datagram: bytes) -> np.void | None:
        """The whole packet as one structured record, or None (counted) when it
        is not a packet the platform maps."""
        if len(datagram) < HEADER.itemsize:
            self.counts["too_short"] += 1
            return None
        fmt = int.from_bytes(datagram[:2], "little")
        if fmt not in LAST_ID:
            self.counts["unknown_format"] += 1
            return None
        packet_id = datagram[6]
        if packet_id > LAST_ID[fmt]:
            self.counts["unknown_id"] += 1
            return None
        name = PACKET_NAMES[packet_id]
        dtype = PACKETS.get((fmt, packet_id))
        if dtype is None:
            self.counts[f"ignored:{name}"] += 1
            return None
        if len(datagram) != dtype.itemsize:
            self.counts[f"wrong_size:{name}"] += 1
            return None
        record: np.void = np.frombuffer(datagram, dtype=dtype, count=1)[0]
        session_time = float(record["header"]["session_time"])
        if not -86_400 <= session_time <= 7 * 86_400:  # NaN fails too: no game clock to anchor
            self.counts["bad_session_time"] += 1
            return None
        self.counts[f"parsed:{name}"] += 1
        return record

    @property
    def skipped(self) -> dict[str, int]:
        """Datagrams skipped, by reason (the ignored packet types included)."""
        return {k: v for k, v in sorted(self.counts.items()) if not k.startswith("parsed:")}


def as_code(packet: np.void) -> str:
    """An Event packet's four-letter code as text (bad bytes replaced)."""
    return bytes(packet["code"]).decode("ascii", errors="replace")


def event_details(packet: np.void) -> np.void | None:
    """An Event packet's details for the codes in EVENT_DETAILS (None otherwise)."""
    dtype = EVENT_DETAILS.get(bytes(packet["code"]))
    if dtype is None:
        return None
    raw = bytes(packet["details"])
    details: np.void = np.frombuffer(raw[: dtype.itemsize], dtype=dtype, count=1)[0]
    return details


def parse_many(datagrams: bytes, fmt: int, packet_id: int) -> np.ndarray:
    """Many packets of one type and format laid end to end, parsed at once (a
    recording's CarTelemetry packets for the benchmark, or a synthetic batch)."""
    return np.frombuffer(datagrams, dtype=PACKETS[(fmt, packet_id)])


def header(datagram: bytes) -> np.void:
    record: np.void = np.frombuffer(datagram, dtype=HEADER, count=1)[0]
    return record
