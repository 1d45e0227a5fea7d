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

Bounds (msgspec `Meta`, checked while decoding): what a working feed can send
at all and the database can hold. They are deliberately wider than the physical
limits the anomaly rules flag (`pipeline.processing.anomaly`): FastF1 really
sends throttle 104 and gear 64/128 as error codes, and those samples are stored
and flagged, not refused. A value outside these bounds (speed 5000, a negative
seq, a date in 2150) can only come from a broken producer: it is dead-lettered
as `out_of_bounds`. Bounds relative to the stream (event time far ahead of the
run's clock, seq far ahead of the car's) need state and are checked by the
consumer's processing (`pipeline.processing.batch`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import msgspec

SCHEMA_VERSION = 1
SCHEMA_NAME = f"f1.telemetry.v{SCHEMA_VERSION}"

HEADER_SCHEMA = "schema"
HEADER_SOURCE = "source"
HEADER_PRODUCED_AT = "produced_at_us"


_MIN_DATE_US = 631_152_000_000_000  # 1990-01-01: before any car data feed
_MAX_DATE_US = 4_102_444_800_000_000  # 2100-01-01
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Text = Annotated[str, msgspec.Meta(max_length=64)]
DriverNumber = Annotated[int, msgspec.Meta(ge=0, le=999)]
Seq = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]  # a PostgreSQL integer
DateUs = Annotated[int, msgspec.Meta(ge=_MIN_DATE_US, le=_MAX_DATE_US)]
Code = Annotated[int, msgspec.Meta(ge=-1, le=255)]  # gear (-1 reverse), DRS: one byte
Percent = Annotated[float, msgspec.Meta(ge=0, le=255)]  # FastF1's error code 104 included
Count = Annotated[int, msgspec.Meta(ge=0, le=1_000)]


# gc=False: a message holds only scalars and text (no cycles), so the collector
# need not track the thousands a batch decodes.
class TelemetrySample(msgspec.Struct, frozen=True, gc=False, tag="sample", tag_field="kind"):
    """One car sample. `run_id` names one replay or live session instance;
    `seq` numbers the car's samples within the run (0, 1, 2, ...)."""

    v: Annotated[int, msgspec.Meta(ge=1, le=SCHEMA_VERSION)]
    run_id: Id
    session_key: Id
    driver_number: DriverNumber
    driver: Text
    seq: Seq
    date_us: DateUs
    session_time_s: Annotated[float, msgspec.Meta(ge=-86_400, le=7 * 86_400)]
    speed: Annotated[float, msgspec.Meta(ge=0, le=1_000)]  # km/h
    rpm: Annotated[float, msgspec.Meta(ge=0, le=30_000)]
    gear: Code
    throttle: Percent
    brake: Percent
    drs_open: bool
    drs: Code | None = None  # the source's own DRS code (FastF1: 0-14), for reference
    lap_number: Count | None = None
    stint: Count | None = None
    compound: Text | None = None
    tyre_life: Annotated[float, msgspec.Meta(ge=0, le=1_000)] | None = None
    position: Count | None = None  # at the line ending the previous lap (or live, from the game)
    last_lap_s: Annotated[float, msgspec.Meta(ge=0, le=3_600)] | None = None  # previous lap
    gap_ahead_s: Annotated[float, msgspec.Meta(ge=0, le=86_400)] | None = None  # to the car ahead
    race_laps: Count | None = None  # scheduled race distance
    is_in_lap: bool = False
    is_out_lap: bool = False
    track_status: Text | None = None
    resampled: bool = False


class EndOfStream(msgspec.Struct, frozen=True, gc=False, tag="end", tag_field="kind"):
    """Sent to every partition after a run's last sample; `samples` is how many
    samples of the run the producer delivered to that partition."""

    v: Annotated[int, msgspec.Meta(ge=1, le=SCHEMA_VERSION)]
    run_id: Id
    session_key: Id
    partition: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
    samples: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]  # a PostgreSQL bigint


Message = TelemetrySample | EndOfStream

# Columns of a decoded batch, in schema order (what processing and the sink use).
SAMPLE_FIELDS: tuple[str, ...] = TelemetrySample.__struct_fields__

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Message)


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


class HoldsNul(ValueError):
    """A text with a NUL character: PostgreSQL cannot store one (it would fail
    the whole batch's COPY), so the message is refused as invalid."""


def decode(raw: bytes) -> Message:
    """Decode and type-check one message; raises msgspec.DecodeError (bad JSON),
    msgspec.ValidationError (wrong type, missing field, out of bounds) with the
    JSON path, or HoldsNul."""
    if b"\\u0000" in raw:  # JSON writes NUL only so; a substring search, not a regex per field
        raise HoldsNul("a text holds a NUL character (\\u0000), which PostgreSQL cannot store")
    decoded: Message = _decoder.decode(raw)
    return decoded


def decode_many(raws: Sequence[bytes]) -> list[Message]:
    """`decode` of each, the NUL check over all of them at once; raises as
    `decode` does, for the first message that fails, or HoldsNul when any may
    hold a NUL (then `decode` of each says which, if any, does)."""
    # One search of them all joined: only malformed messages could form a match
    # across a boundary, and those fail `decode` of each anyway. JSON writes NUL
    # only as an escape: a batch without a backslash (most) needs only that one
    # byte's search, which is 40 times faster than the six bytes' (a fifth of
    # decoding a batch).
    joined = b"".join(raws)
    if b"\\" in joined and b"\\u0000" in joined:
        raise HoldsNul("a text holds a NUL character (\\u0000), which PostgreSQL cannot store")
    decode_value = _decoder.decode
    return [decode_value(raw) for raw in raws]


def is_out_of_bounds(error: msgspec.ValidationError) -> bool:
    """A value of the right type outside the schema's bounds (vs a wrong type or
    a missing field): msgspec says `Expected `int` <= 255` or `length <= 64`."""
    return any(sign in str(error) for sign in (">=", "<=", "length"))


class BadHeader(ValueError):
    """A header that is present but unusable (the message is dead-lettered)."""


def produced_at(message_headers: Any) -> int | None:
    """The `produced_at_us` header as an int (None when absent); a value that is
    not a plausible microsecond timestamp raises BadHeader, as does a `schema`
    header naming another schema."""
    # This runs for every message: our producers' headers (in the order `headers`
    # writes them, with valid values) take one check; anything else, or a value
    # to refuse, goes through the general path.
    if message_headers and len(message_headers) == 3:
        (schema_key, schema_value), (source_key, _), (at_key, at) = message_headers
        if (
            schema_key == HEADER_SCHEMA
            and source_key == HEADER_SOURCE
            and at_key == HEADER_PRODUCED_AT
            and schema_value == _SCHEMA_NAME_BYTES
            and type(at) is bytes
            and len(at) <= 19
            and at.isdigit()
            and _MIN_DATE_US <= (value := int(at)) <= _MAX_DATE_US
        ):
            return value
    return _produced_at_read(message_headers)


def produced_at_many(many_headers: Sequence[Any]) -> list[int] | None:
    """`produced_at` of each message's headers when every one is as our producers
    write them (checked over the batch at once), else None: `produced_at` of
    each then says which is wrong, or that a header is absent."""
    try:
        times = [
            at
            for (schema_key, schema_value), (source_key, _), (at_key, at) in many_headers
            if schema_key == HEADER_SCHEMA
            and schema_value == _SCHEMA_NAME_BYTES
            and source_key == HEADER_SOURCE
            and at_key == HEADER_PRODUCED_AT
        ]
        digits = b"".join(times)  # TypeError unless every value is bytes
    except (TypeError, ValueError):  # no headers, or not these three
        return None
    if (
        len(times) != len(many_headers)
        or not all(times)  # an empty value among digits
        or not digits.isdigit()
        or max(map(len, times)) > 19
    ):
        return None
    values = list(map(int, times))
    if min(values) < _MIN_DATE_US or max(values) > _MAX_DATE_US:
        return None
    return values


def _produced_at_read(message_headers: Any) -> int | None:
    found = dict(reversed(message_headers)) if message_headers else {}  # the first name wins
    name = _bytes_or_none(found.get(HEADER_SCHEMA))
    raw = _bytes_or_none(found.get(HEADER_PRODUCED_AT))
    if name is not None and name != _SCHEMA_NAME_BYTES:
        shown = as_text(name[:40])
        raise BadHeader(f"header {HEADER_SCHEMA}={shown!r}: this consumer reads {SCHEMA_NAME}")
    if raw is None:
        return None
    if not (raw.isdigit() and len(raw) <= 19 and _MIN_DATE_US <= int(raw) <= _MAX_DATE_US):
        shown = as_text(raw[:40])
        raise BadHeader(
            f"header {HEADER_PRODUCED_AT}={shown!r} is not a wall-clock time in microseconds"
        )
    return int(raw)


def _bytes_or_none(value: Any) -> bytes | None:
    return value if isinstance(value, bytes) else None


_SCHEMA_NAME_BYTES = SCHEMA_NAME.encode()


def message_key(session_key: str, driver_number: int) -> bytes:
    return f"{session_key}:{driver_number}".encode()


def headers(source: str, produced_at_us: int) -> list[tuple[str, bytes]]:
    return [
        (HEADER_SCHEMA, SCHEMA_NAME.encode()),
        (HEADER_SOURCE, source.encode()),
        (HEADER_PRODUCED_AT, str(produced_at_us).encode()),
    ]


def as_text(raw: bytes) -> str:
    """Bytes from the wire as text PostgreSQL can store (bad UTF-8 and NUL replaced)."""
    return raw.decode(errors="replace").replace("\x00", "\ufffd")


def header_value(message_headers: Any, name: str) -> bytes | None:
    """A header's value from confluent-kafka's header list (None if absent)."""
    for key, value in message_headers or ():
        if key == name:
            return value if isinstance(value, bytes) else None
    return None
