"""Live scores: every served prediction scored once its outcome is known.

The models predict, at each lap's start, whether the car's event happens on that
lap (or within the horizon's laps). Once the car has started the lap after the
horizon, the platform knows: for a replayed race, from its lap table, the same
labels the models were trained on (`pipeline.ml.laps`); for a game session (a
race no cache holds), pit stops from the stream itself (the car's next lap is
an out-lap), the other two left unscored (the game's feed does not tell them).

Per run, model, role (the champion as served, the challenger in shadow) and
version: laps scored, positive laps, PR-AUC, Brier score, calibration (five
quantile bins), alerts raised at the version's threshold and how many were
right. Written to `live_model_scores` (one row per key, replaced as the run goes
on), which the Models dashboard reads and `f1 models compare` prints.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.ml.labels import LABELS, lap_labels
from pipeline.ml.train import registered_name
from pipeline.settings import Settings, get_settings
from pipeline.sinks import telemetry_db

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

log = logging.getLogger(__name__)

SCORE_TABLE = "live_model_scores"
ROLES = {"champion": "", "challenger": "_challenger"}  # role -> column suffix
CALIBRATION_BINS = 5
SCORE_COLUMNS = (
    "run_id", "session_key", "label", "role", "version", "horizon_laps", "laps", "positives",
    "base_rate", "pr_auc", "brier", "alerts", "alert_hits", "alert_precision", "calibration",
    "outcomes_from",
)  # fmt: skip


@dataclass(frozen=True)
class VersionInfo:
    threshold: float
    horizon_laps: int


def _version_info(label: str, version: int, settings: Settings, cache: dict[Any, Any]) -> Any:
    """The version's threshold and horizon, from its training run (cached per call)."""
    import mlflow

    key = (label, version)
    if key not in cache:
        client = mlflow.MlflowClient(settings.mlflow_tracking_uri)
        model = client.get_model_version(registered_name(label, settings), str(version))
        run = client.get_run(str(model.run_id)).data
        cache[key] = VersionInfo(
            float(run.metrics.get("threshold", 0.5)), int(run.params.get("horizon_laps", 1))
        )
    return cache[key]


def served_laps(conn: Any, run_id: str, label: str, role: str) -> pd.DataFrame:
    """One row per (car, lap, version) the model served in the run: its probability."""
    import pandas as pd
    from psycopg import sql

    suffix = ROLES[role]
    p = sql.Identifier(f"{label}{suffix}_p")
    version = sql.Identifier(f"{label}{suffix}_version")
    # One pass over the run's rows of the primary key, no join (a join planned on a
    # run too new for the table's statistics went quadratic).
    query = sql.SQL(
        "SELECT driver_number, lap_number, {version} AS version, avg({p}) AS p "
        "FROM telemetry_predictions "
        "WHERE run_id = %s AND in_domain AND {p} IS NOT NULL AND lap_number IS NOT NULL "
        "GROUP BY driver_number, lap_number, {version}"
    ).format(p=p, version=version)
    rows = conn.execute(query, (run_id,)).fetchall()
    return pd.DataFrame(rows, columns=["driver_number", "lap_number", "version", "p"])


def _car_progress(conn: Any, run_id: str) -> pd.DataFrame:
    """Per car and lap: whether it started as an out-lap (the lap before ended in the pits)."""
    import pandas as pd

    rows = conn.execute(
        "SELECT driver_number, lap_number, bool_or(is_out_lap) FROM telemetry_samples "
        "WHERE run_id = %s AND lap_number IS NOT NULL GROUP BY driver_number, lap_number",
        (run_id,),
    ).fetchall()
    return pd.DataFrame(rows, columns=["driver_number", "lap_number", "out_lap"])


def outcomes(
    session_key: str, progress: pd.DataFrame, horizon_laps: int, settings: Settings
) -> tuple[pd.DataFrame, str]:
    """Per (car, lap): each label's outcome (NaN: not known yet, or not observable)."""
    import numpy as np
    import pandas as pd

    from pipeline.ml.laps import available_races, lap_tables

    races = [r for r in available_races(settings) if r.key == session_key]
    index = ["driver_number", "lap_number"]
    if races:
        table = lap_tables(races, settings)
        labels = lap_labels(table, horizon_laps).astype(float)
        known = pd.concat([table[index].astype(int), labels], axis=1).set_index(index)
        source = "lap table"
    else:  # a game session: pit stops show in the stream as the next lap's out-lap flag
        car = progress.sort_values(index).groupby("driver_number")
        pit = np.zeros(len(progress), dtype=bool)
        ordered = progress.sort_values(index)
        for ahead in range(1, horizon_laps + 1):
            nxt = car["out_lap"].shift(-ahead).astype("boolean").fillna(False)
            pit |= nxt.to_numpy(dtype=bool)
        known = pd.DataFrame(
            {"pit_stop": pit.astype(float), "tire_failure": np.nan, "crash_risk": np.nan},
            index=pd.MultiIndex.from_frame(ordered[index].astype(int)),
        )
        source = "stream"
    # A lap's outcome is known once the car has started the lap after the horizon.
    latest = progress.groupby("driver_number")["lap_number"].max()
    laps = known.index.get_level_values("lap_number").to_numpy()
    cars = known.index.get_level_values("driver_number")
    reached = latest.reindex(cars).to_numpy(dtype=float)
    known.loc[~(laps + horizon_laps <= reached), list(LABELS)] = np.nan
    return known, source


def _calibration(y: np.ndarray, p: np.ndarray) -> list[dict[str, float]]:
    import numpy as np

    edges = np.unique(np.quantile(p, np.linspace(0, 1, CALIBRATION_BINS + 1)))
    bins = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, max(len(edges) - 2, 0))
    return [
        {"p_mean": float(p[bins == b].mean()), "rate": float(y[bins == b].mean()),
         "laps": int((bins == b).sum())}
        for b in np.unique(bins)
    ]  # fmt: skip


def score_run(run_id: str, settings: Settings | None = None) -> list[dict[str, Any]]:
    """Score what has matured of the run's predictions and store the rows."""
    import numpy as np
    from psycopg import sql
    from sklearn.metrics import average_precision_score, brier_score_loss

    settings = settings or get_settings()
    cache: dict[Any, Any] = {}
    rows = []
    with telemetry_db.connect(settings, autocommit=True) as conn:
        found = conn.execute(
            "SELECT session_key FROM stream_runs WHERE run_id = %s", (run_id,)
        ).fetchone()
        if not found:
            raise ValueError(f"no stream run {run_id!r}: see `f1 runs` for the ones there are")
        session_key = str(found[0])
        progress = _car_progress(conn, run_id)
        for label in LABELS:
            for role in ROLES:
                served = served_laps(conn, run_id, label, role)
                for _, laps in served.groupby("version"):
                    version = int(laps["version"].iloc[0])
                    info = _version_info(label, version, settings, cache)
                    known, source = outcomes(session_key, progress, info.horizon_laps, settings)
                    keys = list(zip(laps["driver_number"], laps["lap_number"], strict=True))
                    y = known[label].reindex(keys).to_numpy(dtype=float)
                    mature = ~np.isnan(y)
                    y, p = y[mature].astype(int), laps["p"].to_numpy(dtype=float)[mature]
                    if not len(y):
                        continue
                    alerts = p >= info.threshold
                    rows.append({
                        "run_id": run_id, "session_key": session_key, "label": label,
                        "role": role, "version": version, "horizon_laps": info.horizon_laps,
                        "laps": len(y), "positives": int(y.sum()), "base_rate": float(y.mean()),
                        "pr_auc": float(average_precision_score(y, p)) if 0 < y.sum() < len(y)
                        else None,
                        "brier": float(brier_score_loss(y, p, labels=[0, 1])),
                        "alerts": int(alerts.sum()), "alert_hits": int((alerts & (y == 1)).sum()),
                        "alert_precision": float(y[alerts].mean()) if alerts.any() else None,
                        "calibration": json.dumps(_calibration(y, p)),
                        "outcomes_from": source,
                    })  # fmt: skip
        with conn.transaction():
            conn.execute(
                sql.SQL("DELETE FROM {} WHERE run_id = %s").format(sql.Identifier(SCORE_TABLE)),
                (run_id,),
            )
            if rows:
                insert = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
                    sql.Identifier(SCORE_TABLE),
                    sql.SQL(", ").join(map(sql.Identifier, SCORE_COLUMNS)),
                    sql.SQL(", ").join(sql.Placeholder() * len(SCORE_COLUMNS)),
                )
                conn.cursor().executemany(
                    insert, [tuple(r[c] for c in SCORE_COLUMNS) for r in rows]
                )
    log.info("run %s: %d live score rows", run_id, len(rows))
    return rows


def read_scores(run_id: str, settings: Settings | None = None) -> pd.DataFrame:
    import pandas as pd
    from psycopg import sql

    with telemetry_db.connect(settings or get_settings(), autocommit=True) as conn:
        query = sql.SQL(
            "SELECT {}, scored_at FROM {} WHERE run_id = %s ORDER BY label, role, version"
        ).format(
            sql.SQL(", ").join(map(sql.Identifier, SCORE_COLUMNS)), sql.Identifier(SCORE_TABLE)
        )
        rows = conn.execute(query, (run_id,)).fetchall()
    return pd.DataFrame(rows, columns=[*SCORE_COLUMNS, "scored_at"])


def score_while_running(
    run_id: str,
    *,
    interval_s: float = 60.0,
    wait_for_start_s: float = 180.0,
    settings: Settings | None = None,
    stop: Any = None,
) -> list[dict[str, Any]]:
    """Score the run every `interval_s` while its producer runs (each lap as it
    matures), once more when the producer has finished, and return. The last laps
    are scored after the run is complete (the f1_stream DAG's `score_final`). A run
    whose producer has not started after `wait_for_start_s` is not waited for."""
    import threading
    import time

    settings = settings or get_settings()
    stop = stop or threading.Event()
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    while True:
        with telemetry_db.connect(settings, autocommit=True) as conn:
            row = conn.execute(
                "SELECT finished_at IS NOT NULL FROM stream_runs WHERE run_id = %s", (run_id,)
            ).fetchone()
        if row is not None:
            try:
                rows = score_run(run_id, settings)
            except Exception:  # a scoring hiccup (MLflow away) must not end the live scores
                log.exception("scoring run %s failed; trying again in %.0f s", run_id, interval_s)
        finished = row is not None and bool(row[0])
        never_started = row is None and time.monotonic() - started > wait_for_start_s
        if finished or never_started or stop.is_set():
            return rows
        stop.wait(interval_s)


def latest_scored_run(settings: Settings | None = None) -> str | None:
    with telemetry_db.connect(settings or get_settings(), autocommit=True) as conn:
        row = conn.execute(
            "SELECT run_id FROM live_model_scores ORDER BY scored_at DESC LIMIT 1"
        ).fetchone()
    return str(row[0]) if row else None


def compare(run_id: str, settings: Settings | None = None) -> pd.DataFrame:
    """Champion and challenger side by side per model: what training measured
    (cross-validated and test PR-AUC, threshold) and what the run measured live."""
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from pipeline.ml.train import CHALLENGER, CHAMPION

    settings = settings or get_settings()
    live = read_scores(run_id, settings)
    client = mlflow.MlflowClient(settings.mlflow_tracking_uri)
    rows = []
    for label in LABELS:
        for role in (CHAMPION, CHALLENGER):
            try:
                version = client.get_model_version_by_alias(registered_name(label, settings), role)
                run = client.get_run(str(version.run_id)).data
            except MlflowException:
                continue
            number = int(version.version)
            scored = live[(live["label"] == label) & (live["version"] == number)]
            row = scored.iloc[0] if len(scored) else None
            rows.append({
                "model": label, "alias": role, "version": number,
                "line": run.params.get("comparison_line"),
                "cv_pr_auc": run.metrics.get("cv_pr_auc"),
                "test_pr_auc": run.metrics.get("test_pr_auc"),
                "threshold": run.metrics.get("threshold"),
                "live_laps": None if row is None else int(row["laps"]),
                "live_base_rate": None if row is None else row["base_rate"],
                "live_pr_auc": None if row is None else row["pr_auc"],
                "live_brier": None if row is None else row["brier"],
                "live_alerts": None if row is None else int(row["alerts"]),
                "live_alert_precision": None if row is None else row["alert_precision"],
            })  # fmt: skip
    return pd.DataFrame(rows)
