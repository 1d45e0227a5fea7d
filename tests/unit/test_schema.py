"""The message schema's bounds and header checks (what the consumer dead-letters)."""

from __future__ import annotations

import msgspec
import pytest

from pipeline import schema

GOOD = schema.TelemetrySample(
    v=schema.SCHEMA_VERSION, run_id="2023_Monaco_R@test", session_key="2023_Monaco_R",
    driver_number=1, driver="VER", seq=0, date_us=1_685_275_200_000_000, session_time_s=0.0,
    speed=250.0, rpm=11_000.0, gear=7, throttle=104.0, brake=0.0, drs_open=False, drs=12,
)  # fmt: skip


def _with(**changes: object) -> bytes:
    return schema.encode(msgspec.structs.replace(GOOD, **changes))


def test_feed_error_codes_decode_as_they_are() -> None:
    # FastF1's throttle 104 and gear 128 are stored and flagged, not refused.
    assert schema.decode(_with(gear=128)) == msgspec.structs.replace(GOOD, gear=128)


@pytest.mark.parametrize(
    "changes",
    [{"speed": 5_000.0}, {"rpm": -1.0}, {"gear": 300}, {"seq": -1}, {"seq": 2**31},
     {"date_us": 10**18}, {"driver": "X" * 65}, {"run_id": ""}, {"tyre_life": 2_000.0}],
)  # fmt: skip
def test_values_no_feed_sends_are_out_of_bounds(changes: dict[str, object]) -> None:
    with pytest.raises(msgspec.ValidationError) as err:
        schema.decode(_with(**changes))
    assert schema.is_out_of_bounds(err.value)


def test_a_wrong_type_is_invalid_not_out_of_bounds() -> None:
    raw = schema.encode(GOOD).replace(b'"speed":250.0', b'"speed":"fast"')
    with pytest.raises(msgspec.ValidationError) as err:
        schema.decode(raw)
    assert not schema.is_out_of_bounds(err.value)


def test_a_nul_in_a_text_is_refused() -> None:
    with pytest.raises(schema.HoldsNul, match="NUL"):
        schema.decode(_with(driver="V\x00R"))


def test_a_batch_holding_a_nul_is_refused_whatever_else_it_escapes() -> None:
    # decode_many looks for the escape only where a backslash is: other escapes
    # decode, a NUL in any message refuses the batch (each is then read alone).
    escaped = [_with(driver='V"R'), _with(driver="V\\R"), _with(driver="V\u00e9R")]
    assert [sample.driver for sample in schema.decode_many(escaped)] == ['V"R', "V\\R", "VéR"]
    with pytest.raises(schema.HoldsNul, match="NUL"):
        schema.decode_many([*escaped, _with(driver="V\x00R")])


@pytest.mark.parametrize(
    ("headers", "message"),
    [([("produced_at_us", b"soon")], "not a wall-clock time"),
     ([("produced_at_us", b"-5")], "not a wall-clock time"),
     ([("produced_at_us", b"9" * 40)], "not a wall-clock time"),
     ([("schema", b"f1.telemetry.v9")], "this consumer reads f1.telemetry.v1"),
     # Our producers' layout (the fast path) with a value to refuse:
     ([*schema.headers("x", 1)[:2], ("produced_at_us", b"soon")], "not a wall-clock time"),
     (schema.headers("x", 1), "not a wall-clock time"),
     ([("schema", b"f1.telemetry.v9"), *schema.headers("x", 1_764_576_000_000_000)[1:]],
      "this consumer reads f1.telemetry.v1")],
)  # fmt: skip
def test_bad_headers_are_refused_with_the_reason(
    headers: list[tuple[str, bytes]], message: str
) -> None:
    with pytest.raises(schema.BadHeader, match=message):
        schema.produced_at(headers)


def test_good_or_missing_headers_pass() -> None:
    assert schema.produced_at(schema.headers("x", 1_764_576_000_000_000)) == 1_764_576_000_000_000
    assert schema.produced_at(None) is None
    at = 1_764_576_000_000_000
    assert schema.produced_at(schema.headers("x", at)[::-1]) == at  # any order
    repeated = [("produced_at_us", str(at + 1).encode()), *schema.headers("x", at)]
    assert schema.produced_at(repeated) == at + 1  # the first of a repeated name wins
    assert schema.as_text(b"a\x00\xffb") == "a\ufffd\ufffdb"


@pytest.mark.parametrize(
    "odd",
    [None, [], schema.headers("x", 1_764_576_000_000_000)[::-1],
     [*schema.headers("x", 1)[:2], ("produced_at_us", b"")],
     [*schema.headers("x", 1)[:2], ("produced_at_us", None)],
     [*schema.headers("x", 1)[:2], ("produced_at_us", b"+1764576000000000")],
     [*schema.headers("x", 1)[:2], ("produced_at_us", b"9" * 40)],
     schema.headers("x", 1),
     [("schema", b"f1.telemetry.v9"), *schema.headers("x", 1_764_576_000_000_000)[1:]],
     [*schema.headers("x", 1_764_576_000_000_000), ("extra", b"1")]],
)  # fmt: skip
def test_headers_checked_as_a_batch_agree_with_each_checked_alone(odd: object) -> None:
    at = 1_764_576_000_000_000
    good = schema.headers("fastf1-replay", at)
    assert schema.produced_at_many([good, good]) == [at, at]
    batch = [good, odd, good]
    many = schema.produced_at_many(batch)
    try:
        each = [schema.produced_at(headers) for headers in batch]
    except schema.BadHeader:
        assert many is None  # a header to refuse: each message is then read alone
    else:
        assert many in (None, each)
