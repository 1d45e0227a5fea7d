"""One consumer batch composed: decode -> per-car processing -> scoring, into
what one commit writes.

The consumer (`pipeline.kafka.consumer`) keeps the Kafka and transaction I/O:
it polls, sends the dead letters this module names, and commits the rows,
offsets and states in one transaction. Everything between is here, so a batch
of messages becomes the same rows whoever polled it.

Decoding checks a poll as a whole (each check one pass over the batch) and,
when something in it is unfit to store (rare), again message by message, so
each unfit one is refused alone with its reason. The rest is column-wise over
the batch (`pipeline.processing.batch`), and each model predicts once per batch.
"""

from __future__ import annotations

import functools
import logging
import operator
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from pipeline import schema
from pipeline.processing import batch as batch_logic
from pipeline.processing.columns import Columns, concat

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

log = logging.getLogger(__name__)


class BatchScorer(Protocol):
    """The seam where models plug in: score a processed batch (its samples and
    their features) with one call per model, returning prediction columns row for
    row with the samples, stored in the samples' own rows
    (`telemetry_db.PREDICTION_COLUMNS`)."""

    def start(self) -> None:
        """Get ready before the first batch (load models)."""

    def stop(self) -> None:
        """The consumer has ended: stop what `start` began (threads)."""

    def score(self, samples: Columns, features: pd.DataFrame) -> Columns: ...


@dataclass
class Decoded:
    """One poll's messages, type-checked. `partitions`, `offsets` and `produced`
    run beside `samples`: each sample's partition, offset and produce time (None
    without the header)."""

    samples: list[schema.TelemetrySample] = field(default_factory=list)
    partitions: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    produced: Sequence[int | None] = field(default_factory=list)
    ends: list[tuple[int, schema.EndOfStream]] = field(default_factory=list)
    dead: list[tuple[Any, str, str]] = field(default_factory=list)  # message, class, reason
    broker_errors: int = 0
    new_runs: dict[str, tuple[str, str]] = field(default_factory=dict)  # run -> session, source
    next_offsets: dict[int, int] = field(default_factory=dict)  # per partition read

    @classmethod
    def of(
        cls, samples: list[schema.TelemetrySample], *, produced_at_us: int | None = None
    ) -> Decoded:
        """Samples as if read in this order from partition 0 (a batch built by a
        benchmark or a test rather than polled)."""
        rows = len(samples)
        return cls(samples, [0] * rows, list(range(rows)), [produced_at_us] * rows)


def decode(
    messages: Sequence[Any],
    *,
    assigned: AbstractSet[int],
    runs_seen: AbstractSet[str],
    max_message_bytes: int,
) -> Decoded:
    """Type-check each polled message (confluent-kafka's; only read): samples,
    end markers, and the dead (with their class and reason). Messages of
    partitions no longer `assigned` are left to their new owner."""
    decoded, headers = _decode_clean(messages, assigned, max_message_bytes)
    if decoded is None:  # something to refuse or skip: each message on its own
        decoded, headers = _decode_each(messages, assigned, max_message_bytes)
    samples = decoded.samples
    for run_id in set(map(_RUN_ID, samples)) - runs_seen:  # rare: a run starts
        at = next(i for i, sample in enumerate(samples) if sample.run_id == run_id)
        source = schema.header_value(headers[at], schema.HEADER_SOURCE)
        decoded.new_runs[run_id] = (
            samples[at].session_key,
            schema.as_text(source[:100]) if source else "unknown",
        )
    return decoded


def _decode_clean(
    messages: Sequence[Any], assigned: AbstractSet[int], max_message_bytes: int
) -> tuple[Decoded | None, list[Any]]:
    """The batch when every message is fit to store, or None (and `_decode_each`
    finds what is not): each check runs over the whole batch in one C-level pass,
    as per-message Python steps were most of the decode's cost."""
    if any([message.error() is not None for message in messages]):
        return None, []
    partitions = [message.partition() for message in messages]
    if not set(partitions) <= assigned:
        return None, []
    values = [message.value() for message in messages]
    if None in values or max(map(len, values), default=0) > max_message_bytes:
        return None, []
    headers = [message.headers() for message in messages]
    produced = schema.produced_at_many(headers)
    if produced is None:
        return None, []
    try:
        decoded_values = schema.decode_many(values)
    except (msgspec.ValidationError, msgspec.DecodeError, schema.HoldsNul):
        return None, []
    offsets = [message.offset() for message in messages]
    decoded = Decoded(
        samples=decoded_values,  # type: ignore[arg-type]  # end markers taken out below
        partitions=partitions,
        offsets=offsets,
        produced=produced,
        next_offsets={p: offset + 1 for p, offset in zip(partitions, offsets, strict=True)},
    )
    is_end = [type(value) is schema.EndOfStream for value in decoded_values]
    if any(is_end):  # a run's last batch: its end markers apart from its samples
        kept = [i for i, end in enumerate(is_end) if not end]
        decoded.ends = [(partitions[i], decoded_values[i]) for i, end in enumerate(is_end) if end]  # type: ignore[misc]
        decoded.samples = [decoded_values[i] for i in kept]  # type: ignore[misc]
        decoded.partitions = [partitions[i] for i in kept]
        decoded.offsets = [offsets[i] for i in kept]
        decoded.produced = [produced[i] for i in kept]
        headers = [headers[i] for i in kept]
    return decoded, headers


def _decode_each(
    messages: Sequence[Any], assigned: AbstractSet[int], max_message_bytes: int
) -> tuple[Decoded, list[Any]]:
    """Each message on its own: what cannot be stored is dead-lettered with its
    class and reason. Returns the samples' headers beside them."""
    decoded, headers, produced_at = Decoded(), [], []
    for message in messages:
        if message.error() is not None:  # counted; the client retries by itself
            decoded.broker_errors += 1
            log.warning("broker reported %s", message.error())
            continue
        partition, offset = message.partition(), message.offset()
        if partition is None or offset is None or partition not in assigned:
            continue  # revoked during this poll: its new owner reads it again
        decoded.next_offsets[partition] = offset + 1
        raw = message.value() or b""
        if len(raw) > max_message_bytes:
            reason = f"{len(raw)} bytes, over the {max_message_bytes}-byte limit"
            decoded.dead.append((message, "oversized", reason))
            continue
        try:
            produced = schema.produced_at(message.headers())
            value = schema.decode(raw)
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
        decoded.samples.append(value)
        decoded.partitions.append(partition)
        decoded.offsets.append(offset)
        produced_at.append(produced)
        headers.append(message.headers())
    decoded.produced = produced_at
    return decoded, headers


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
TEXT_FIELDS = frozenset(n for n, d in COLUMN_DTYPES.items() if d == "object")


def _typed(name: str, values: Sequence[Any]) -> np.ndarray:
    import numpy as np

    dtype = COLUMN_DTYPES[name]
    return np.array(values, dtype="float64" if dtype == "Int64" else dtype)  # None -> NaN


def columns_frame(columns: dict[str, Sequence[Any]]) -> pd.DataFrame:
    """Sample fields (name -> values, None where absent) as typed columns."""
    typed = {name: _typed(name, columns[name]) for name in schema.SAMPLE_FIELDS}
    rows = len(typed[schema.SAMPLE_FIELDS[0]])
    return Columns(typed, rows, INT_COLUMNS).to_pandas()


_RUN_ID = operator.attrgetter("run_id")


@functools.cache
def _row_dtype() -> np.dtype:
    """One sample as a numpy record: its fields' column types in schema order
    (nullable integers as float, None read as NaN)."""
    import numpy as np

    kinds = {"int64": "i8", "Int64": "f8", "float64": "f8", "bool": "?", "object": "O"}
    return np.dtype([(name, kinds[COLUMN_DTYPES[name]]) for name in schema.SAMPLE_FIELDS])


def columns(decoded: Decoded) -> Columns:
    """The samples as typed columns, with their partition, offset and produce time:
    no pandas (see `pipeline.processing.columns`)."""
    import numpy as np

    # A tuple per sample, read by numpy into records in one pass, then a copy per
    # field: measured on real batches, a quarter less CPU than a numpy conversion
    # of each field's values (the tuples transposed), which took as long as
    # decoding the messages.
    records = np.array([msgspec.structs.astuple(s) for s in decoded.samples], dtype=_row_dtype())
    data = {
        name: _shared(records[name]) if name in TEXT_FIELDS else np.ascontiguousarray(records[name])
        for name in schema.SAMPLE_FIELDS
    }
    data["partition"] = np.array(decoded.partitions, dtype=np.int64)
    data["offset"] = np.array(decoded.offsets, dtype=np.int64)
    data["produced_at_us"] = np.array(decoded.produced, dtype=np.float64)  # None -> NaN
    return Columns(data, len(records), INT_COLUMNS)


def _shared(texts: np.ndarray) -> np.ndarray:
    """Equal texts as one object: a batch's run, session, driver, compound and
    track status are a few values, each decoded anew for every message. Read
    again by later steps (grouping the cars, the features, Arrow for COPY) on
    other threads, those thousands of objects had left the cache; a few shared
    ones stay in it, and each message's own are freed with it, while still hot."""
    import numpy as np

    # A dict, not pandas' factorize: as fast on a batch of 5,000, five times
    # faster on a 1x batch of 20 (factorize's fixed ~10 µs a column).
    first: dict[str | None, str | None] = {}
    return np.array([first.setdefault(text, text) for text in texts.tolist()], dtype=object)


def decode_columns(
    messages: Sequence[Any],
    *,
    assigned: AbstractSet[int],
    runs_seen: AbstractSet[str],
    max_message_bytes: int,
) -> tuple[Decoded, Columns]:
    """The consumer's decode path: `decode`, then the samples' `columns`. The
    decoded samples are dropped once in the columns (`Decoded.samples` left
    empty), as the consumer drops the batch's messages once decoded: freed while
    the cache still holds them. Freed with their batch, after the next batches
    had passed through the cache, they made decoding and the columns a tenth
    slower (real batches, alternating: median 4.15 -> 3.71 and 7.28 -> 6.66 µs a
    message on two runs of a busy 2-core machine)."""
    decoded = decode(
        messages, assigned=assigned, runs_seen=runs_seen, max_message_bytes=max_message_bytes
    )
    samples = columns(decoded)
    decoded.samples = []
    return decoded, samples


def frame(decoded: Decoded) -> pd.DataFrame:
    """`columns` as a DataFrame (nullable integers as Int64)."""
    return columns(decoded).to_pandas()


@dataclass
class ComposedBatch:
    """What one commit writes, and what the consumer reports of it."""

    decoded: Decoded
    result: batch_logic.BatchResult
    idled: set[int]  # partitions whose state changed by closing idle cars
    scored: Columns | None = None  # the models' columns, row for row with the samples

    def score(self, scorers: Sequence[BatchScorer]) -> Columns | None:
        """The models' columns (one predict call per model), kept in `scored`.
        Apart from `compose` so the consumer runs it on a thread of its own:
        XGBoost predicts without the GIL, on the other core, while the next batch
        is composed (the models were a third of a consumer's time)."""
        result = self.result
        if len(result.columns) and result.features is not None and scorers:
            scored = Columns({}, len(result.columns))
            for scorer in scorers:
                columns = scorer.score(result.columns, result.features)
                for name in columns:
                    scored[name] = columns[name]
                scored.int_columns |= columns.int_columns
            self.scored = scored
        return self.scored


def compose(
    messages: Sequence[Any],
    states: dict[int, batch_logic.PartitionState],
    window: batch_logic.WindowConfig,
    *,
    with_features: bool,
    runs_seen: AbstractSet[str],
    max_message_bytes: int,
    caught_up: set[int],
    now_us: int,
) -> ComposedBatch:
    """Decode, process (anomalies, windows, and with `with_features` the models'
    features), end the runs whose end markers came, and close idle cars:
    `states` are updated in place. `ComposedBatch.score` scores it."""
    decoded, samples = decode_columns(
        messages, assigned=states.keys(), runs_seen=runs_seen, max_message_bytes=max_message_bytes
    )
    result = batch_logic.process(
        samples, states, window, with_features=with_features, now_us=now_us
    )
    if result.rejected:  # rare: the message of each refused sample, by its position
        at = {(m.partition(), m.offset()): m for m in messages if m.error() is None}
        decoded.dead += [
            (at[(p, offset)], batch_logic.OUT_OF_BOUNDS, reason)
            for p, offset, reason in result.rejected
        ]
    ended = [
        batch_logic.end_run(states[partition], end.run_id, window)
        for partition, end in decoded.ends
    ]
    idle_windows, idled = batch_logic.close_idle(states, window, now_us=now_us, caught_up=caught_up)
    result.windows = concat([result.windows, *ended, idle_windows])
    return ComposedBatch(decoded=decoded, result=result, idled=idled)
