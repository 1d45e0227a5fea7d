"""The consumer's decode of one poll (`compose.decode`): a batch fit to store is
checked as a whole, anything else message by message; both must give the same
samples, and every unfit message its dead-letter class.

The messages are confluent-kafka's own `Message` objects, built as the client
builds them on a poll (the library's constructor; no broker needed to decode)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from confluent_kafka import KafkaError, Message

from pipeline import schema
from pipeline.processing import compose

AT = 1_764_576_000_000_000
RUN = "2023_Monaco_R@decode"
MAX_BYTES = 10_000
ASSIGNED = frozenset({0, 1})


def _sample(driver_number: int, seq: int, **changes: Any) -> schema.TelemetrySample:
    sample = schema.TelemetrySample(
        v=schema.SCHEMA_VERSION, run_id=RUN, session_key="2023_Monaco_R",
        driver_number=driver_number, driver="VER", seq=seq,
        date_us=1_685_275_200_000_000 + seq, session_time_s=float(seq), speed=250.0,
        rpm=11_000.0, gear=7, throttle=104.0, brake=0.0, drs_open=False, drs=12,
    )  # fmt: skip
    return msgspec.structs.replace(sample, **changes)


def _message(partition: int, offset: int, value: bytes | None, **kwargs: Any) -> Message:
    kwargs.setdefault("headers", schema.headers("fastf1-replay", AT + offset))
    return Message(topic="t", partition=partition, offset=offset, value=value, **kwargs)


def _clean_batch() -> list[Message]:
    return [
        _message(offset % 2, offset, schema.encode(_sample(offset % 2 + 1, offset // 2)))
        for offset in range(12)
    ]


def _decode(messages: list[Message]) -> compose.Decoded:
    return compose.decode(messages, assigned=ASSIGNED, runs_seen=set(), max_message_bytes=MAX_BYTES)


def _kept(decoded: compose.Decoded) -> tuple[Any, ...]:
    return (
        decoded.samples, list(decoded.partitions), decoded.offsets, list(decoded.produced),
        decoded.ends, decoded.next_offsets, decoded.broker_errors,
    )  # fmt: skip


def test_a_clean_batch_decodes_as_its_messages_do_one_by_one() -> None:
    messages = _clean_batch()
    decoded = _decode(messages)
    one_by_one, _ = compose._decode_each(messages, ASSIGNED, MAX_BYTES)
    assert _kept(decoded) == _kept(one_by_one)
    assert len(decoded.samples) == 12 and not decoded.dead
    assert decoded.produced == [AT + offset for offset in range(12)]
    assert decoded.next_offsets == {0: 11, 1: 12}
    assert decoded.new_runs == {RUN: ("2023_Monaco_R", "fastf1-replay")}


def test_a_batch_columns_hold_each_distinct_text_once() -> None:
    # Equal texts share one object (read again by later steps, a few stay cached);
    # values and None unchanged.
    messages = _clean_batch()
    messages[3] = _message(1, 3, schema.encode(_sample(2, 1, compound="SOFT", driver="HAM")))
    _, columns = compose.decode_columns(
        messages, assigned=ASSIGNED, runs_seen=set(), max_message_bytes=MAX_BYTES
    )
    assert list(columns["run_id"]) == [RUN] * 12
    assert len({id(text) for text in columns["run_id"]}) == 1
    assert list(columns["driver"]) == ["VER"] * 3 + ["HAM"] + ["VER"] * 8
    assert len({id(text) for text in columns["driver"]}) == 2
    assert list(columns["compound"]) == [None] * 3 + ["SOFT"] + [None] * 8


def test_end_markers_are_taken_apart_from_the_samples() -> None:
    messages = _clean_batch()
    end = schema.EndOfStream(v=1, run_id=RUN, session_key="2023_Monaco_R", partition=1, samples=6)
    messages.append(_message(1, 99, schema.encode(end)))  # a run's last message
    decoded = _decode(messages)
    assert decoded.ends == [(1, end)]
    assert len(decoded.samples) == len(decoded.offsets) == len(decoded.produced) == 12
    assert 99 not in decoded.offsets and decoded.next_offsets[1] == 100
    assert _kept(decoded) == _kept(compose._decode_each(messages, ASSIGNED, MAX_BYTES)[0])


# One message unfit to store, with the class the consumer dead-letters it under
# (None: not dead-lettered, but skipped or counted).
UNFIT = {
    "malformed": (b'{"kind":"sample",', {}),
    "empty": (None, {}),
    "invalid": (schema.encode(_sample(1, 50, driver="V\x00R")), {}),
    "wrong type": (schema.encode(_sample(1, 50)).replace(b'"gear":7', b'"gear":"7"'), {}),
    "out_of_bounds": (schema.encode(_sample(1, 50, speed=5000.0)), {}),
    "oversized": (b" " * (MAX_BYTES + 1), {}),
    "bad_header": (
        schema.encode(_sample(1, 50)),
        {"headers": [*schema.headers("x", AT)[:2], ("produced_at_us", b"soon")]},
    ),
    "a foreign schema": (
        schema.encode(_sample(1, 50)),
        {"headers": [("schema", b"f1.telemetry.v9"), *schema.headers("x", AT)[1:]]},
    ),
    "a broker error": (None, {"error": KafkaError(KafkaError._TRANSPORT)}),
}
DEAD_CLASS = {
    "malformed": "malformed", "empty": "malformed", "invalid": "invalid",
    "wrong type": "invalid", "out_of_bounds": "out_of_bounds", "oversized": "oversized",
    "bad_header": "bad_header", "a foreign schema": "bad_header", "a broker error": None,
}  # fmt: skip


@pytest.mark.parametrize("case", UNFIT)
def test_one_unfit_message_is_refused_alone(case: str) -> None:
    value, kwargs = UNFIT[case]
    messages = _clean_batch()
    messages.insert(7, _message(0, 50, value, **kwargs))
    decoded = _decode(messages)
    assert _kept(decoded)[:4] == _kept(_decode(_clean_batch()))[:4]  # every other sample kept
    if DEAD_CLASS[case] is None:
        assert decoded.broker_errors == 1 and not decoded.dead
    else:
        ((message, error_class, reason),) = decoded.dead
        assert (message.offset(), error_class) == (50, DEAD_CLASS[case]) and reason


def test_messages_of_a_partition_no_longer_assigned_are_left_to_its_owner() -> None:
    messages = [*_clean_batch(), _message(2, 0, schema.encode(_sample(3, 0)))]
    decoded = _decode(messages)
    assert 2 not in decoded.partitions and 2 not in decoded.next_offsets and not decoded.dead
    assert _kept(decoded) == _kept(_decode(_clean_batch()))


def test_headers_without_a_produce_time_decode_with_none() -> None:
    messages = [_message(0, 0, schema.encode(_sample(1, 0)), headers=None)]
    assert _decode(messages).produced == [None]
