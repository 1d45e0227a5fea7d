"""What the consumer tells the live page after each committed batch.

One PostgreSQL NOTIFY per batch, sent right after the batch's transaction
committed (so the page never shows rows that were rolled back): each car's latest
sample and predictions in the batch, the newest anomaly alerts, and the batch's
produce-to-commit latency. NOTIFY payloads must stay under 8000 bytes, so cars
travel as rows of a fixed column list and the alerts are capped; anything left
out is counted in the payload (`alerts_total`, `cars_left_out`), never dropped
silently.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from pipeline.processing.columns import Columns

MAX_PAYLOAD_BYTES = 7900  # PostgreSQL refuses NOTIFY payloads of 8000 bytes or more
MAX_ALERTS = 12
# Column order of each row in "cars"; the page reads it from the payload. "run" is
# an index into the payload's "runs" (run ids are long; a batch has one or two).
CAR_FIELDS = (
    "run", "session_key", "driver", "driver_number", "date_us", "lap_number", "position", "speed",
    "gear", "rpm", "throttle", "brake", "drs_open", "compound", "tyre_life", "anomalies",
)  # fmt: skip
PREDICTIONS = ("pit_stop_p", "tire_failure_p", "crash_risk_p")
# At each served version's own threshold (pipeline.ml.serving): what the page highlights.
MODEL_ALERTS = ("pit_stop_alert", "tire_failure_alert", "crash_risk_alert")
ALERT_FIELDS = ("run", "session_key", "driver", "date_us", "reason", "value")


def batch_update(
    *,
    consumer: str,
    samples: pd.DataFrame | Columns,
    predictions: pd.DataFrame | Columns | None,
    alerts: pd.DataFrame | Columns,
    latency_ms: tuple[float | None, float | None],
    committed_us: int,
) -> bytes | None:
    """The NOTIFY payload of one committed batch (None when it stored no sample).

    `predictions` is row for row with `samples` (the scorer's output) or None
    when no model is served; `alerts` is the batch's anomaly event log. Plain
    numpy over the few columns it sends: it runs for every batch."""
    import numpy as np
    import pandas as pd

    if not len(samples):
        return None
    # The latest sample of each car in this batch (positions, so predictions align).
    run_ids = np.asarray(samples["run_id"], dtype=object)
    drivers = np.asarray(samples["driver"], dtype=object)
    run_codes, _ = pd.factorize(run_ids)
    driver_codes, names = pd.factorize(drivers)
    cars, _ = pd.factorize(run_codes * len(names) + driver_codes)  # (run, driver), as met
    order = np.lexsort((np.asarray(samples["date_us"]), cars))
    by_car = cars[order]
    last = order[np.r_[by_car[1:] != by_car[:-1], True]]

    def latest(name: str, dtype: Any = None) -> np.ndarray:
        return np.asarray(samples[name], dtype=dtype)[last]

    runs = sorted(set(run_ids.tolist()))
    run_index = {run: i for i, run in enumerate(runs)}
    rows = [
        [run_index[r] for r in latest("run_id").tolist()],
        latest("session_key").tolist(),
        latest("driver").tolist(),
        latest("driver_number").astype(int).tolist(),
        latest("date_us").astype(np.int64).tolist(),
        _ints(latest("lap_number", float)),
        _ints(latest("position", float)),
        latest("speed", float).round(1).tolist(),
        latest("gear").astype(int).tolist(),
        latest("rpm", float).round(0).tolist(),
        latest("throttle", float).round(1).tolist(),
        latest("brake", float).round(1).tolist(),
        latest("drs_open").astype(bool).tolist(),
        [c if isinstance(c, str) else None for c in latest("compound", object).tolist()],
        _floats(latest("tyre_life", float), 1),
        [list(a) if a is not None and len(a) else [] for a in latest("anomalies", object)],
    ]
    fields = list(CAR_FIELDS)
    for name in PREDICTIONS:
        fields.append(name)
        column = predictions.get(name) if predictions is not None else None
        values = None if column is None else np.asarray(column, dtype=float)[last]
        rows.append([None] * len(last) if values is None else _floats(values, 4))
    for name in MODEL_ALERTS:
        fields.append(name)
        column = predictions.get(name) if predictions is not None else None
        rows.append(
            [None] * len(last)
            if column is None
            else [None if pd.isna(v) else bool(v) for v in np.asarray(column, dtype=object)[last]]
        )
    alert_times = np.asarray(alerts["date_us"]) if len(alerts) else np.zeros(0, dtype=np.int64)
    newest = np.argsort(alert_times, kind="stable")[-MAX_ALERTS:]

    def alert(name: str) -> list[Any]:
        return list(np.asarray(alerts[name])[newest].tolist())

    update: dict[str, Any] = {
        "consumer": consumer,
        "runs": runs,
        "committed_us": committed_us,
        "samples": len(samples),
        "latency_p50_ms": latency_ms[0],
        "latency_p99_ms": latency_ms[1],
        "car_fields": fields,
        "cars": [list(row) for row in zip(*rows, strict=True)],
        "alert_fields": list(ALERT_FIELDS),
        "alerts": [
            [run_index[run], session, driver, date_us, reason, _plain(value)]
            for run, session, driver, date_us, reason, value in zip(
                alert("run_id"),
                alert("session_key"),
                alert("driver"),
                [int(t) for t in alert("date_us")],
                alert("reason"),
                alert("value"),
                strict=True,
            )
        ],
        "alerts_total": len(alerts),
        "cars_left_out": 0,
    }
    payload = orjson.dumps(update)
    # Too big only with many sessions in one batch: shed alerts first, then cars.
    while len(payload) > MAX_PAYLOAD_BYTES and (update["alerts"] or update["cars"]):
        if update["alerts"]:
            update["alerts"] = update["alerts"][: len(update["alerts"]) // 2]
        else:
            keep = len(update["cars"]) // 2
            update["cars_left_out"] += len(update["cars"]) - keep
            update["cars"] = update["cars"][:keep]
        payload = orjson.dumps(update)
    return payload


def _plain(value: Any) -> float | None:
    return None if value is None or value != value else round(float(value), 3)


def _ints(column: np.ndarray) -> list[int | None]:
    return [None if v != v else int(v) for v in column.astype(float)]


def _floats(column: np.ndarray, digits: int) -> list[float | None]:
    return [None if v != v else round(v, digits) for v in column.astype(float).tolist()]
