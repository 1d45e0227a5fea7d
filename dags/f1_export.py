"""
### f1_export

Exports FastF1 race sessions to a Parquet dataset (plus a CSV copy and a
manifest) under `EXPORT_DIR`, one mapped task per session. Left empty, the form
exports the three sample races (2021, 2023 and 2024 Monaco). Each export records
an event on the `f1_telemetry_exports` Asset, which training is scheduled on.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Asset, Param, dag, task

from pipeline.sources.export import EXPORTS_ASSET_NAME, EXPORTS_ASSET_URI

EXPORTS = Asset(name=EXPORTS_ASSET_NAME, uri=EXPORTS_ASSET_URI)


@dag(
    dag_id="f1_export",
    doc_md=__doc__,
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["f1", "batch", "export"],
    default_args={"retries": 1, "retry_delay": pendulum.duration(seconds=30)},
    params={
        "year": Param(
            None, type=["null", "integer"], minimum=2018, title="Season",
            description="Leave empty to export the three sample races.",
        ),
        "event": Param(
            "Monaco", type="string", title="Event",
            description="Event name, location or country (e.g. Monaco, Monza, Silverstone).",
        ),
        "session": Param(
            "R", type="string", enum=["R", "Q", "S", "SQ", "FP1", "FP2", "FP3"], title="Session",
            description="R race, Q qualifying, S sprint, FP1-3 practice.",
        ),
        "formats": Param(
            ["parquet", "csv"], type="array", items={"type": "string", "enum": ["parquet", "csv"]},
            title="Formats", description="Parquet is always written; add csv for a CSV copy.",
        ),
        "resample": Param(
            None, type=["null", "string"], title="Resample to",
            description="Leave empty for the samples as they came (~4 Hz). A rule such as "
            "100ms resamples each car with FastF1 into a separate export; interpolated rows "
            "are flagged resampled.",
        ),
    },
)  # fmt: skip
def f1_export() -> None:
    @task
    def sessions_to_export(params: dict | None = None) -> list[dict]:  # type: ignore[type-arg]
        from pipeline.sources.export import SAMPLE_SESSIONS

        params = params or {}
        if params.get("year") is None:
            chosen = SAMPLE_SESSIONS
        else:
            chosen = ((params["year"], params["event"], params["session"]),)
        formats = params.get("formats") or ["parquet"]
        resample = params.get("resample") or None
        return [
            {"year": y, "event": e, "session": s, "formats": formats, "resample": resample}
            for y, e, s in chosen
        ]

    @task(outlets=[EXPORTS], map_index_template="{{ task.op_kwargs['spec']['year'] }}")
    def export(spec: dict, *, outlet_events=None) -> dict:  # type: ignore[no-untyped-def,type-arg]
        """Export one session; its manifest becomes the Asset event's extra."""
        from pipeline.sources.export import export_session, read_manifest

        folder = export_session(
            spec["year"], spec["event"], spec["session"], formats=spec["formats"],
            resample=spec.get("resample"),
        )  # fmt: skip
        manifest = read_manifest(folder.name) or {}
        summary = {
            "key": manifest["key"],
            "path": str(folder),
            "rows": manifest["rows"]["telemetry"],
            "checksum_sha256": manifest["checksum_sha256"],
        }
        outlet_events[EXPORTS].extra = summary
        return summary

    export.expand(spec=sessions_to_export())


f1_export()
