"""
### f1_train

Trains the three models (pit stop, tyre-cliff proxy, incident) on one row per
lap of every race the FastF1 caches hold (82 races of 2021-2024 with lap
timing, three with car telemetry). Everything is chosen on leave-one-race-out
cross-validation of the development races (hyper-parameters, the decision
threshold, the champion); the test races (by default the 2024 season) are
scored once and reported; the demo race is held out of both, so its live
predictions are out of sample. Every run is tracked in MLflow (experiments
`f1-pit-stop`, `f1-tire-failure`, `f1-crash-risk`) with per-race base rates
and scores, the ablation and a model card. A version becomes `champion` when
it beats its baseline and the champion of the same comparison line (label,
horizon, races) on cross-validated PR-AUC; else `challenger`. The consumers
serve whatever `champion` points at.

Tasks: `split_races` → `build_lap_tables` (each race's lap table built once and
kept) → `train`, one mapped task per model → `summary`.

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
        "races": Param(
            [], type="array", items={"type": "string"}, title="Races",
            description="Race keys such as 2023_Bahrain_R; empty: every race the caches hold.",
        ),
        "test_season": Param(
            2024, type="integer", title="Test season",
            description="Its races are the test races: scored once, never chosen on.",
        ),
        "test_races": Param(
            [], type="array", items={"type": "string"}, title="Test races",
            description="Instead of the test season's races.",
        ),
        "horizon_laps": Param(
            1, type="integer", minimum=1, title="Horizon (laps)",
            description="A label is 1 when its event happens on this lap or within n laps.",
        ),
    },
)  # fmt: skip
def f1_train() -> None:
    @task
    def split_races(params: dict | None = None) -> dict:  # type: ignore[type-arg]
        """Which races develop and which test; fails clearly on unknown races."""
        from dataclasses import asdict

        from pipeline.ml.train import TrainConfig
        from pipeline.ml.train import split_races as split
        from pipeline.settings import get_settings

        params = params or {}
        config = TrainConfig(
            races=tuple(params["races"]), test_season=int(params["test_season"]),
            test_races=tuple(params["test_races"]), horizon_laps=int(params["horizon_laps"]),
        )  # fmt: skip
        races, _ = split(config, get_settings())
        print(f"{len(races.development)} development, {len(races.test)} test races; "
              f"{races.held_out} held out")  # fmt: skip
        return asdict(config)

    @task
    def build_lap_tables(config: dict) -> int:  # type: ignore[type-arg]
        """Each race's lap table, built once and kept for the training tasks."""
        from pipeline.ml.laps import lap_tables
        from pipeline.ml.train import TrainConfig
        from pipeline.ml.train import split_races as split
        from pipeline.settings import get_settings

        settings = get_settings()
        _, races = split(TrainConfig.from_dict(config), settings)
        return len(lap_tables(races, settings, on_race=lambda r: print("lap table", r.key)))

    # One model at a time: each fit already uses both cores, and a finished model
    # swaps into the demo sooner than three sharing the machine would.
    @task(map_index_template="{{ task.op_kwargs['label'] }}", max_active_tis_per_dagrun=1)
    def train(label: str, config: dict) -> dict:  # type: ignore[type-arg]
        """Select, test, log to MLflow, register and promote one model."""
        from dataclasses import asdict

        from pipeline.ml.train import TrainConfig, train_all

        [result] = train_all(TrainConfig.from_dict(config), labels=(label,))
        return asdict(result)

    @task
    def summary(results: list) -> dict:  # type: ignore[type-arg]
        """One line per model: status, test PR-AUC vs baseline and base rate, alias."""
        return {
            r["label"]: {
                "status": r["status"],
                "test_pr_auc": r["metrics"].get("test_pr_auc"),
                "baseline_test_pr_auc": r["metrics"].get("baseline_test_pr_auc"),
                "test_base_rate": r["metrics"].get("test_base_rate"),
                "cv_pr_auc": r["metrics"].get("cv_pr_auc"),
                "version": r["version"],
                "alias": r["alias"],
                "reason": r["reason"],
            }
            for r in results
        }

    config = split_races()
    laps = build_lap_tables(config)
    results = train.partial(config=config).expand(label=["pit_stop", "tire_failure", "crash_risk"])
    laps >> results
    summary(results)


f1_train()
