"""The hot path's frame (`pipeline.processing.columns`); the sink's binary COPY of
it is tested against PostgreSQL in tests/integration/test_postgres.py."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.processing.columns import Columns
from pipeline.sinks import telemetry_db


def laps() -> Columns:
    return Columns(
        {
            "lap_number": np.array([1.0, np.nan, 3.0]),  # a nullable integer
            "driver": np.array(["VER", None, "LEC"], dtype=object),
            "at": np.array([0, 1_000_000, 2_500_000]).astype("datetime64[us]"),
        },
        3,
        frozenset({"lap_number"}),
    )


def test_columns_take_rows_by_position_or_mask_and_refuse_a_wrong_length() -> None:
    batch = laps()
    assert len(batch.take(np.array([2, 0]))) == 2
    assert batch.take(np.array([2, 0]))["driver"].tolist() == ["LEC", "VER"]
    masked = batch.take(np.array([True, False, True]))
    assert len(masked) == 2 and masked["driver"].tolist() == ["VER", "LEC"]
    copy = batch.copy()
    copy["flag"] = True  # a scalar for every row
    assert copy["flag"].tolist() == [True, True, True] and "flag" not in batch
    with pytest.raises(ValueError, match="2 values for 3 rows"):
        copy["bad"] = [1, 2]


def test_columns_round_trip_through_pandas_with_nullable_integers_and_utc_times() -> None:
    frame = laps().to_pandas()
    assert str(frame["lap_number"].dtype) == "Int64"
    assert frame["lap_number"].isna().tolist() == [False, True, False]
    assert str(frame["at"].dt.tz) == "UTC"
    back = Columns.from_pandas(frame[["lap_number", "driver"]])
    assert back.int_columns == {"lap_number"}
    np.testing.assert_array_equal(back["lap_number"], [1.0, np.nan, 3.0])


def test_the_sinks_binary_copy_refuses_a_column_type_it_cannot_encode() -> None:
    with pytest.raises(TypeError, match="column at is interval, which the sink cannot COPY"):
        telemetry_db.binary_copy(
            laps(), ["lap_number", "at"], {"lap_number": "smallint", "at": "interval"}
        )


def test_the_sinks_binary_copy_refuses_a_number_outside_its_columns_width() -> None:
    # Numbers are narrowed by numpy, which would wrap 70,000 into a smallint
    # silently: the sink refuses it, naming the column, as Arrow's cast did.
    batch = Columns({"lap_number": np.array([1.0, np.nan, 70_000.0])}, 3, frozenset({"lap_number"}))
    with pytest.raises(ValueError, match=r"column lap_number holds 70000, outside its int16 range"):
        telemetry_db.binary_copy(batch, ["lap_number"], {"lap_number": "smallint"})
    fits = Columns({"lap_number": np.array([1.0, np.nan, 3.0])}, 3, frozenset({"lap_number"}))
    assert telemetry_db.binary_copy(fits, ["lap_number"], {"lap_number": "smallint"})
