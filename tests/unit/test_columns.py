"""The hot path's frame (`pipeline.processing.columns`) and the sink's CSV of it."""

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


def test_the_sinks_csv_writes_integers_nulls_and_utc_times_as_postgresql_reads_them() -> None:
    written = telemetry_db.csv_bytes(laps(), ["lap_number", "driver", "at"]).decode()
    rows = written.splitlines()
    assert rows[0] == '1,"VER",1970-01-01 00:00:00.000000Z'  # 1, not 1.0; UTC marked
    assert rows[1] == ",,1970-01-01 00:00:01.000000Z"  # NULLs: empty and unquoted
    assert rows[2] == '3,"LEC",1970-01-01 00:00:02.500000Z'
    same = telemetry_db.csv_bytes(laps().to_pandas(), ["lap_number", "driver", "at"]).decode()
    assert same == written  # a DataFrame of the same rows writes the same CSV
