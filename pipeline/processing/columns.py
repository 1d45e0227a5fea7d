"""A batch as named numpy columns: the hot path's frame.

Every pandas operation costs tens to hundreds of microseconds whatever the
batch's size (a batch at 1x is one burst of ~10 samples), and a consumer batch
went through about a hundred of them: most of a consumer's CPU at 1x. `Columns`
is the small part of a DataFrame's interface the hot path uses (`frame[name]`
gives a numpy array, `len`, `empty`, `take`), so the processing functions read
a DataFrame or a `Columns` alike, with `np.asarray(frame[name])`.

Nullable integers (lap number, position, ...) are float64 with NaN here, exact
up to 2**53; `to_pandas` gives them back as pandas' Int64, and the sink writes
them as integers (`pipeline.sinks.telemetry_db`). Times are datetime64 in UTC.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd


class Columns(Mapping[str, "np.ndarray"]):
    """Columns of one length, by name, in insertion order."""

    __slots__ = ("_data", "_rows", "int_columns")

    def __init__(
        self, data: dict[str, np.ndarray], rows: int, int_columns: frozenset[str] = frozenset()
    ) -> None:
        self._data = data
        self._rows = rows
        # Nullable integer columns held as float (NaN = missing), typed back in to_pandas.
        self.int_columns = int_columns

    def __getitem__(self, name: str) -> np.ndarray:
        return self._data[name]

    def __setitem__(self, name: str, values: Any) -> None:
        import numpy as np

        array = np.asarray(values)
        if array.ndim == 0:  # a scalar for every row, as in pandas
            array = np.full(self._rows, values)
        if len(array) != self._rows:
            raise ValueError(f"column {name!r}: {len(array)} values for {self._rows} rows")
        self._data[name] = array

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:  # rows, as a DataFrame's len
        return self._rows

    @property
    def columns(self) -> list[str]:
        return list(self._data)

    @property
    def empty(self) -> bool:
        return self._rows == 0

    def take(self, rows: np.ndarray) -> Columns:
        """The rows at these positions (an integer array) or where a mask is true."""
        import numpy as np

        rows = np.asarray(rows)
        count = int(rows.sum()) if rows.dtype == bool else len(rows)
        return Columns({k: v[rows] for k, v in self._data.items()}, count, self.int_columns)

    def copy(self) -> Columns:
        """A new set of the same arrays (adding a column leaves the original alone)."""
        return Columns(dict(self._data), self._rows, self.int_columns)

    @classmethod
    def from_pandas(cls, frame: pd.DataFrame) -> Columns:
        """A DataFrame's columns; nullable integers become float with NaN."""
        import numpy as np

        data, ints = {}, set()
        for name in frame.columns:
            column = frame[name]
            if str(column.dtype) in ("Int64", "Int32", "Int16", "Int8"):
                data[str(name)] = column.to_numpy(dtype=float, na_value=np.nan)
                ints.add(str(name))
            else:
                data[str(name)] = column.to_numpy()
        return cls(data, len(frame), frozenset(ints))

    def to_pandas(self) -> pd.DataFrame:
        import pandas as pd

        frame = pd.DataFrame(self._data, index=pd.RangeIndex(self._rows))
        for name in self.int_columns & self._data.keys():
            frame[name] = pd.array(frame[name].to_numpy(), dtype="Int64")
        for name, values in self._data.items():
            if values.dtype.kind == "M":
                frame[name] = frame[name].dt.tz_localize("UTC")
        return frame


def concat(parts: Sequence[Columns]) -> Columns:
    """Columns of the same names, one after the other (the first's names)."""
    import numpy as np

    kept = [part for part in parts if len(part)]
    if len(kept) <= 1:  # nothing to join (most batches): no copy
        return kept[0] if kept else parts[0]
    data = {name: np.concatenate([part[name] for part in kept]) for name in parts[0]}
    ints = frozenset().union(*(part.int_columns for part in kept))
    return Columns(data, sum(len(part) for part in kept), ints)


def running_max_before(
    values: np.ndarray, starts: np.ndarray, bases: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per value, the greatest of its car's base and of the car's values before
    it; and per car, the greatest of its base and all its values: integer
    `values` grouped by car (each car's first at `starts`, its base in `bases`).
    Every car in one pass: per car, numpy's calls cost more than their work (at
    1x a batch holds one sample of each car)."""
    import numpy as np

    n, cars = len(values), len(starts)
    if not cars:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    counts = np.diff(starts, append=n)
    base_at = starts + np.arange(cars)  # each car's base goes just before its values
    at = np.arange(1, n + 1) + np.repeat(np.arange(cars), counts)
    merged = np.empty(n + cars, dtype=np.int64)
    merged[base_at], merged[at] = bases, values
    car = np.repeat(np.arange(cars), counts + 1)
    # One running max over the cars' values lifted by a step per car: a car's
    # keys all lie above the cars' before it, so its running max never reaches
    # back into theirs. The step is the values' span (event times of one batch);
    # for spans too wide for int64 keys (dates decades apart), their ranks.
    low, span = int(merged.min()), int(merged.max()) - int(merged.min()) + 1
    if span * cars < 2**62:
        lift = car * span - low
        running = np.maximum.accumulate(merged + lift) - lift
    else:
        ordered, rank = np.unique(merged, return_inverse=True)
        lift = car * len(ordered)
        running = ordered[np.maximum.accumulate(rank.ravel() + lift) - lift]
    # A car's last place in `merged` is just before the next car's base.
    return running[at - 1], running[np.append(base_at[1:], n + cars) - 1]
