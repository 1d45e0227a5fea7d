"""Export a FastF1 session to a Parquet dataset (plus a CSV copy and a manifest).

Layout of one export, `<export_dir>/<year>_<event>_<session>/`:
  telemetry/driver_number=<n>/part-0.parquet   the telemetry table, one folder per car
  laps.parquet, race_control.parquet, track_status.parquet, weather.parquet, results.parquet
  frequency.parquet                             the sample-rate report
  telemetry.csv                                 the telemetry table as CSV
  manifest.json                                 row counts, time range, rates, versions, checksum
Writes go to a temporary sibling folder that is renamed into place, so a reader
sees the old export or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.settings import Settings, get_settings
from pipeline.sources.fastf1_session import load_session
from pipeline.sources.telemetry_table import frequency_report, telemetry_table

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

SIDE_TABLES = {
    "laps": "laps",
    "race_control": "race_control_messages",
    "track_status": "track_status",
    "weather": "weather_data",
    "results": "results",
}


# The offline sample: 2021 and 2024 train the models, 2023 is validated on and replayed.
SAMPLE_SESSIONS = ((2021, "Monaco", "R"), (2023, "Monaco", "R"), (2024, "Monaco", "R"))
FORMATS = ("parquet", "csv")
# 2: the lap context as known at the lap's start (pipeline.sources.lap_context).
EXPORT_FORMAT = 2
# The Airflow Asset every export updates (f1_export) and training is scheduled on (f1_train).
EXPORTS_ASSET_NAME, EXPORTS_ASSET_URI = "f1_telemetry_exports", "file:///f1/exports"


def session_key(year: int, event: str, session: str, resample: str | None = None) -> str:
    """`2023_Monaco_R`, or `2023_Monaco_R_resampled_100ms` for a resampled export."""
    key = f"{year}_{event.replace(' Grand Prix', '').replace(' ', '_')}_{session}"
    return f"{key}_resampled_{resample}" if resample else key


def check_resample_rule(rule: str | None) -> None:
    """Refuse a resampling rule pandas would not understand, before loading anything."""
    import warnings

    import pandas as pd

    if rule is None:
        return
    try:
        with warnings.catch_warnings():  # pandas warns on odd spellings before refusing them
            warnings.simplefilter("ignore", FutureWarning)
            offset = pd.tseries.frequencies.to_offset(rule)
    except ValueError:
        offset = None
    if offset is None or not isinstance(offset, pd.tseries.offsets.Tick):
        raise ValueError(
            f"resample rule {rule!r} is not a fixed interval; use a pandas rule such as "
            "'100ms', '250ms' or '1s', or leave it out for the samples as they came."
        )


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    # Without pandas metadata the bytes depend on content only: same session, same files.
    pq.write_table(table.replace_schema_metadata(None), path, compression="zstd")


def _checksum(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json"):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def write_export(
    key: str,
    telemetry: pd.DataFrame,
    side_tables: dict[str, pd.DataFrame],
    *,
    export_dir: Path,
    extra_manifest: dict[str, Any],
    formats: Sequence[str] = FORMATS,
) -> Path:
    """Write one export atomically and return its folder. The Parquet dataset is
    always written (replay and training read it); `csv` adds the CSV copy."""
    if telemetry.empty:
        raise ValueError(f"{key}: the session has no telemetry samples; nothing exported.")
    export_dir.mkdir(parents=True, exist_ok=True)
    target = export_dir / key
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=export_dir))
    try:
        for number, samples in telemetry.groupby("driver_number", sort=True):
            part = staging / "telemetry" / f"driver_number={number}"
            part.mkdir(parents=True)
            _write_parquet(samples.drop(columns="driver_number"), part / "part-0.parquet")
        for name, frame in side_tables.items():
            _write_parquet(frame, staging / f"{name}.parquet")
        report = frequency_report(telemetry)
        _write_parquet(report, staging / "frequency.parquet")
        if "csv" in formats:
            telemetry.to_csv(
                staging / "telemetry.csv", index=False, date_format="%Y-%m-%dT%H:%M:%S.%fZ"
            )
        manifest = {
            "key": key,
            "export_format": EXPORT_FORMAT,
            **extra_manifest,
            "formats": sorted({"parquet", *formats}),
            "rows": {"telemetry": len(telemetry), **{k: len(v) for k, v in side_tables.items()}},
            "drivers": sorted(int(n) for n in telemetry["driver_number"].unique()),
            "time_range_utc": [
                telemetry["date"].min().isoformat(),
                telemetry["date"].max().isoformat(),
            ],
            "car_data_median_interval_s": float(report["median_interval_s"].median()),
            "car_data_mean_rate_hz": float(report["mean_rate_hz"].mean()),
            "resampled": bool(telemetry["resampled"].any()),
            "checksum_sha256": _checksum(staging),
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        os.chmod(staging, 0o755)
        if target.exists():  # swap: the old export stays whole until the new one is in place
            old = export_dir / f".{key}.old"
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            staging.rename(target)
            shutil.rmtree(old)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


EXPORT_STEPS = ("load session", "build tables", "write dataset")


def export_session(
    year: int,
    event: str,
    session: str = "R",
    *,
    settings: Settings | None = None,
    formats: Sequence[str] = FORMATS,
    resample: str | None = None,
    on_step: Callable[[str], None] = lambda step: None,
) -> Path:
    """Load a session with FastF1 and export it; returns the export folder.
    `resample`: a rule such as "100ms" for a resampled copy (its own key).
    `on_step` hears each of EXPORT_STEPS as it starts (for progress bars)."""
    import fastf1

    check_resample_rule(resample)
    settings = settings or get_settings()
    on_step(EXPORT_STEPS[0])
    loaded = load_session(year, event, session, settings=settings)
    on_step(EXPORT_STEPS[1])
    telemetry = telemetry_table(loaded, resample=resample)
    side = {name: _plain(getattr(loaded, attr)) for name, attr in SIDE_TABLES.items()}
    key = session_key(year, str(loaded.event["EventName"]), session, resample)
    on_step(EXPORT_STEPS[2])
    return write_export(
        key,
        telemetry,
        side,
        export_dir=settings.export_dir,
        formats=formats,
        extra_manifest={
            "year": year,
            "event": str(loaded.event["EventName"]),
            "session": session,
            "resample_rule": resample,
            "fastf1_version": fastf1.__version__,
        },
    )


def _plain(frame: Any) -> pd.DataFrame:
    """A FastF1 table as a plain DataFrame with Parquet-friendly column types."""
    import pandas as pd

    plain = pd.DataFrame(frame).reset_index(drop=True)
    for column in plain.columns:
        if plain[column].dtype == object:
            plain[column] = plain[column].astype("string")
    return plain


def read_manifest(key: str, *, settings: Settings | None = None) -> dict[str, Any] | None:
    """The manifest of an existing export of the current EXPORT_FORMAT, or None
    (an older export is as good as none: exporting again replaces it)."""
    path = (settings or get_settings()).export_dir / key / "manifest.json"
    if not path.exists():
        return None
    manifest: dict[str, Any] = json.loads(path.read_text())
    if manifest.get("export_format", 1) != EXPORT_FORMAT:
        log.warning("%s: export format %s, not %s: export it again (f1 export)", key,
                    manifest.get("export_format", 1), EXPORT_FORMAT)  # fmt: skip
        return None
    return manifest
