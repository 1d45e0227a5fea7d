"""
### f1_train

Trains the three models (pit stop, tyre failure proxy, crash risk) on the
training races and scores them on the validation race, which is never trained
on (by default 2023 Monaco, also the demo stream). Every run is tracked in
MLflow (experiments `f1-pit-stop`, `f1-tire-failure`, `f1-crash-risk`); each
model is registered and gets the alias `champion` only when it beats the
current champion and the baseline on validation PR-AUC, else `challenger`.
The consumers serve whatever `champion` points at.

Tasks: `check_sessions` → `build_data` (features and labels of every race, built
once, written as Parquet) → `train`, one mapped task per model, all reading that
data → `summary`; `clean_up` removes the data when the models are done.

Scheduled on the `f1_telemetry_exports` Asset: a new export retrains.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Asset, Param, dag, task

from pipeline.sources.export import EXPORTS_ASSET_NAME, EXPORTS_ASSET_URI

EXPORTS = Asset(name=EXPORTS_ASSET_NAME, uri=EXPORTS_ASSET_URI)


@dag(
    dag_id="f1_train",
    doc_md=__doc__,
    schedule=[EXPORTS],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["f1", "ml"],
    params={
        "train_sessions": Param(
            ["2021_Monaco_R", "2024_Monaco_R"], type="array", items={"type": "string"},
            title="Training sessions", description="Exports to train on.",
        ),
        "validation_session": Param(
            "2023_Monaco_R", type="string", title="Validation session",
            description="Export to score on; never trained on.",
        ),
        "horizon_s": Param(
            60, type="number", exclusiveMinimum=0, title="Horizon (s)",
            description="A label is 1 when its event starts within this many seconds.",
        ),
        "sample_every": Param(
            4, type="integer", minimum=1, title="Sample every",
            description="Train on every n-th sample per car (4 = 1 Hz).",
        ),
        "trees": Param(200, type="integer", minimum=1, title="XGBoost trees"),
    },
)  # fmt: skip
def f1_train() -> None:
    @task
    def check_sessions(params: dict | None = None) -> dict:  # type: ignore[type-arg]
        """Every session exported; returns the training config."""
        from pipeline.sources.export import read_manifest

        params = params or {}
        sessions = [*params["train_sessions"], params["validation_session"]]
        missing = [s for s in sessions if read_manifest(s) is None]
        if missing:
            raise ValueError(f"not exported: {missing}; run f1_export for them first.")
        if params["validation_session"] in params["train_sessions"]:
            raise ValueError("the validation session must not be a training session.")
        return {
            "train_sessions": list(params["train_sessions"]),
            "validation_session": params["validation_session"],
            "horizon_s": float(params["horizon_s"]),
            "sample_every": int(params["sample_every"]),
            "n_estimators": int(params["trees"]),
        }

    @task
    def build_data(config: dict, run_id: str | None = None) -> str:  # type: ignore[type-arg]
        """Features and labels of every race, built once and shared by the three models."""
        from pipeline.ml.train import TrainConfig, save_datasets
        from pipeline.settings import get_settings

        folder = get_settings().stack_dir / "ml-datasets" / str(run_id)
        return str(save_datasets(TrainConfig.from_dict(config), folder))

    @task(map_index_template="{{ task.op_kwargs['label'] }}")
    def train(label: str, config: dict, data_folder: str) -> dict:  # type: ignore[type-arg]
        """Train, evaluate, log to MLflow, register and promote one model."""
        from dataclasses import asdict
        from pathlib import Path

        from pipeline.ml.train import TrainConfig, train_all

        [result] = train_all(
            TrainConfig.from_dict(config), labels=(label,), data_folder=Path(data_folder)
        )
        return asdict(result)

    @task(trigger_rule="all_done")
    def clean_up(data_folder: str) -> None:
        """The shared training data is only for this run."""
        import shutil

        shutil.rmtree(data_folder, ignore_errors=True)

    @task
    def summary(results: list) -> dict:  # type: ignore[type-arg]
        """One line per model: status, validation PR-AUC vs baseline, alias."""
        return {
            r["label"]: {
                "status": r["status"],
                "val_pr_auc": r["metrics"].get("val_pr_auc"),
                "baseline_val_pr_auc": r["metrics"].get("baseline_val_pr_auc"),
                "version": r["version"],
                "alias": r["alias"],
                "reason": r["reason"],
            }
            for r in results
        }

    config = check_sessions()
    data_folder = build_data(config)
    results = train.partial(config=config, data_folder=data_folder).expand(
        label=["pit_stop", "tire_failure", "crash_risk"]
    )
    summary(results)
    results >> clean_up(data_folder)


f1_train()
