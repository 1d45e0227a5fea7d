"""One consumer batch composed: decode -> per-car processing -> scoring, into
what one commit writes.

The consumer (`pipeline.kafka.consumer`) keeps the Kafka and transaction I/O:
it polls, sends the dead letters this module names, and commits the rows,
offsets and states in one transaction. Everything between is here, so a batch
of messages becomes the same rows whoever polled it.

Decoding is per message (each one must be refused alone, with its reason), the
rest is column-wise over the batch (`pipeline.processing.batch`), and each
model predicts once per batch.
"""

from __future__ import annotations

import logging
from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from pipeline import schema
from pipeline.processing import batch as batch_logic
from pipeline.processing.columns import Columns

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

log = logging.getLogger(__name__)


class BatchScorer(Protocol):
    """The seam where models plug in: score a processed batch (its samples and
    their features) with one call per model, returning rows for `table`."""

    table: str

    def start(self) -> None:
        """Get ready before the first batch (load models)."""

    def score(self, samples: Columns, features: pd.DataFrame) -> Columns: ...


@dataclass
class Decoded:
    samples: list[schema.TelemetrySample] = field(default_factory=list)
    meta: list[tuple[int, int, int | None]] = field(
        default_factory=list
    )  # partition, offset, produced
    ends: list[tuple[int, schema.EndOfStream]] = field(default_factory=list)
    dead: list[tuple[Any, str, str]] = field(default_factory=list)  # message, class, reason
    broker_errors: int = 0
    new_runs: dict[str, tuple[str, str]] = field(default_factory=dict)  # run -> session, source
    next_offsets: dict[int, int] = field(default_factory=dict)  # per partition read


def decode(
    messages: Sequence[Any],
    *,
    assigned: Container[int],
    runs_seen: Container[str],
    max_message_bytes: int,
) -> Decoded:
    """Type-check each polled message (confluent-kafka's; only read): samples,
    end markers, and the dead (with their class and reason). Messages of
    partitions no longer `assigned` are left to their new owner."""
    decoded = Decoded()
    # Names bound once: this loop runs for every message, and attribute lookups
    # were a third of its cost.
    samples, meta, next_offsets = decoded.samples, decoded.meta, decoded.next_offsets
    decode_value, produced_at, new_runs = schema.decode, schema.produced_at, decoded.new_runs
    for message in messages:
        if message.error() is not None:  # counted; the client retries by itself
            decoded.broker_errors += 1
            log.warning("broker reported %s", message.error())
            continue
        partition, offset = message.partition(), message.offset()
        if partition is None or offset is None or partition not in assigned:
            continue  # revoked during this poll: its new owner reads it again
        next_offsets[partition] = offset + 1
        raw = message.value() or b""
        if len(raw) > max_message_bytes:
            reason = f"{len(raw)} bytes, over the {max_message_bytes}-byte limit"
            decoded.dead.append((message, "oversized", reason))
            continue
        try:
            produced = produced_at(message.headers())
            value = decode_value(raw)
        except schema.BadHeader as err:
            decoded.dead.append((message, "bad_header", str(err)))
            continue
        except schema.HoldsNul as err:
            decoded.dead.append((message, "invalid", str(err)))
            continue
        except msgspec.ValidationError as err:
            error_class = "out_of_bounds" if schema.is_out_of_bounds(err) else "invalid"
            decoded.dead.append((message, error_class, str(err)))
            continue
        except msgspec.DecodeError as err:
            decoded.dead.append((message, "malformed", str(err)))
            continue
        if isinstance(value, schema.EndOfStream):
            decoded.ends.append((partition, value))
            continue
        run_id = value.run_id
        if run_id not in runs_seen and run_id not in new_runs:
            source = schema.header_value(message.headers(), schema.HEADER_SOURCE)
            new_runs[run_id] = (
                value.session_key,
                schema.as_text(source[:100]) if source else "unknown",
            )
        samples.append(value)
        meta.append((partition, offset, produced))
    return decoded


def _column_dtypes() -> dict[str, str]:
    """Each sample field's column dtype, from the schema: typed up front, as
    inferring them from Python values costs more than the rest of a small batch."""
    import msgspec.inspect as types

    dtypes = {}
    struct = types.type_info(schema.TelemetrySample)
    assert isinstance(struct, types.StructType)
    for info in struct.fields:
        kind, nullable = info.type, False
        if isinstance(kind, types.UnionType):  # X | None
            (kind,) = (t for t in kind.types if not isinstance(t, types.NoneType))
            nullable = True
        if isinstance(kind, types.IntType):
            dtypes[info.name] = "Int64" if nullable else "int64"
        elif isinstance(kind, types.FloatType):
            dtypes[info.name] = "float64"  # None becomes NaN
        elif isinstance(kind, types.BoolType):
            dtypes[info.name] = "bool"
        else:
            dtypes[info.name] = "object"
    return dtypes


COLUMN_DTYPES = _column_dtypes()
# Nullable integers travel as float with NaN (`Columns`), the produce time too.
INT_COLUMNS = frozenset(n for n, d in COLUMN_DTYPES.items() if d == "Int64") | {"produced_at_us"}


def _typed(name: str, values: Sequence[Any]) -> np.ndarray:
    import numpy as np

    dtype = COLUMN_DTYPES[name]
    return np.array(values, dtype="float64" if dtype == "Int64" else dtype)  # None -> NaN


def columns_frame(columns: dict[str, Sequence[Any]]) -> pd.DataFrame:
    """Sample fields (name -> values, None where absent) as typed columns."""
    typed = {name: _typed(name, columns[name]) for name in schema.SAMPLE_FIELDS}
    rows = len(typed[schema.SAMPLE_FIELDS[0]])
    return Columns(typed, rows, INT_COLUMNS).to_pandas()


def columns(
    samples: Sequence[schema.TelemetrySample], meta: Sequence[tuple[int, int, int | None]]
) -> Columns:
    """The samples as typed columns, with their partition, offset and produce time:
    one numpy conversion per field, no pandas (see `pipeline.processing.columns`)."""
    import numpy as np

    rows = [msgspec.structs.astuple(s) for s in samples]
    values = zip(*rows, strict=True) if rows else ((),) * len(schema.SAMPLE_FIELDS)
    data = {
        name: _typed(name, column)
        for name, column in zip(schema.SAMPLE_FIELDS, values, strict=True)
    }
    partition, offset, produced = zip(*meta, strict=True) if meta else ((), (), ())
    data["partition"] = np.array(partition, dtype=np.int64)
    data["offset"] = np.array(offset, dtype=np.int64)
    data["produced_at_us"] = np.array(produced, dtype=np.float64)
    return Columns(data, len(rows), INT_COLUMNS)


def frame(
    samples: Sequence[schema.TelemetrySample], meta: Sequence[tuple[int, int, int | None]]
) -> pd.DataFrame:
    """`columns` as a DataFrame (nullable integers as Int64)."""
    return columns(samples, meta).to_pandas()


@dataclass
class ComposedBatch:
    """What one commit writes, and what the consumer reports of it."""

    decoded: Decoded
    result: batch_logic.BatchResult
    scored: dict[str, Columns]  # table -> the models' rows
    idled: set[int]  # partitions whose state changed by closing idle cars


def compose(
    messages: Sequence[Any],
    states: dict[int, batch_logic.PartitionState],
    window: batch_logic.WindowConfig,
    scorers: Sequence[BatchScorer],
    *,
    runs_seen: Container[str],
    max_message_bytes: int,
    caught_up: set[int],
    now_us: int,
) -> ComposedBatch:
    """Decode, process (anomalies, windows, features), end the runs whose end
    markers came, close idle cars, and score: `states` are updated in place."""
    decoded = decode(
        messages, assigned=states, runs_seen=runs_seen, max_message_bytes=max_message_bytes
    )
    result = batch_logic.process(
        columns(decoded.samples, decoded.meta), states, window,
        with_features=bool(scorers), now_us=now_us,
    )  # fmt: skip
    if result.rejected:  # rare: the message of each refused sample, by its position
        at = {(m.partition(), m.offset()): m for m in messages if m.error() is None}
        decoded.dead += [
            (at[(p, offset)], batch_logic.OUT_OF_BOUNDS, reason)
            for p, offset, reason in result.rejected
        ]
    for partition, end in decoded.ends:
        result.windows += batch_logic.end_run(states[partition], end.run_id, window)
    idle_windows, idled = batch_logic.close_idle(states, window, now_us=now_us, caught_up=caught_up)
    result.windows += idle_windows
    scored = {}
    if len(result.columns) and result.features is not None:
        scored = {s.table: s.score(result.columns, result.features) for s in scorers}
    return ComposedBatch(decoded=decoded, result=result, scored=scored, idled=idled)
