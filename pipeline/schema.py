"""The one message schema on the telemetry topic, versioned.

Every source maps onto `TelemetrySample`: the FastF1 replay now, the F1 game's
UDP feed later. Messages are JSON (msgspec: encoding and typed decoding in C),
keyed `session:driver` so each car's samples stay in order within one partition.
Units are the same whatever the source: speed km/h, throttle and brake 0-100 %
(FastF1's brake is on/off, so 0 or 100), event time in UTC microseconds.

A replay ends with one `EndOfStream` per partition, so consumers can close the
run's last windows and tell when a run is complete.

Headers: `schema` (SCHEMA_NAME), `source` (e.g. fastf1-replay), `produced_at_us`
(wall clock at produce time, for produce-to-commit latency).
"""

from __future__ import annotations

from typing import Any

import msgspec

SCHEMA_VERSION = 1
SCHEMA_NAME = f"f1.telemetry.v{SCHEMA_VERSION}"

HEADER_SCHEMA = "schema"
HEADER_SOURCE = "source"
HEADER_PRODUCED_AT = "produced_at_us"


class TelemetrySample(msgspec.Struct, frozen=True, tag="sample", tag_field="kind"):
    """One car sample. `run_id` names one replay or live session instance;
    `seq` numbers the car's samples within the run (0, 1, 2, ...)."""

    v: int
    run_id: str
    session_key: str
    driver_number: int
    driver: str
    seq: int
    date_us: int
    session_time_s: float
    speed: float
    rpm: float
    gear: int
    throttle: float
    brake: float
    drs_open: bool
    drs: int | None = None  # the source's own DRS code (FastF1: 0-14), for reference
    lap_number: int | None = None
    stint: int | None = None
    compound: str | None = None
    tyre_life: float | None = None
    position: int | None = None
    is_in_lap: bool = False
    is_out_lap: bool = False
    track_status: str | None = None
    resampled: bool = False


class EndOfStream(msgspec.Struct, frozen=True, tag="end", tag_field="kind"):
    """Sent to every partition after a run's last sample; `samples` is how many
    samples of the run the producer delivered to that partition."""

    v: int
    run_id: str
    session_key: str
    partition: int
    samples: int


Message = TelemetrySample | EndOfStream

# Columns of a decoded batch, in schema order (what processing and the sink use).
SAMPLE_FIELDS: tuple[str, ...] = TelemetrySample.__struct_fields__

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Message)


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decode(raw: bytes) -> Message:
    """Decode and type-check one message; raises msgspec.DecodeError (bad JSON)
    or msgspec.ValidationError (wrong type, missing field) with the JSON path."""
    decoded: Message = _decoder.decode(raw)
    return decoded


def message_key(session_key: str, driver_number: int) -> bytes:
    return f"{session_key}:{driver_number}".encode()


def headers(source: str, produced_at_us: int) -> list[tuple[str, bytes]]:
    return [
        (HEADER_SCHEMA, SCHEMA_NAME.encode()),
        (HEADER_SOURCE, source.encode()),
        (HEADER_PRODUCED_AT, str(produced_at_us).encode()),
    ]


def header_value(message_headers: Any, name: str) -> bytes | None:
    """A header's value from confluent-kafka's header list (None if absent)."""
    for key, value in message_headers or ():
        if key == name:
            return value if isinstance(value, bytes) else None
    return None
