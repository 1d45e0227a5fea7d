"""The model card: a Markdown artifact on each training run."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.ml.features import FEATURE_GROUPS
from pipeline.ml.labels import DEFINITIONS

if TYPE_CHECKING:
    from pipeline.ml.train import ModelResult, TrainConfig

METRICS = ("pr_auc", "roc_auc", "brier", "precision", "recall", "f1", "accuracy")


def _rate_table(result: ModelResult) -> list[str]:
    rows = []
    for race, rate in result.base_rates.items():
        role = "test" if race in result.split.get("test", []) else "development"
        cv = result.cv_by_race.get(race)
        test = result.test_by_race.get(race)
        score = f"{cv:.3f} (CV)" if cv is not None else f"{test:.3f} (test)" if test else "-"
        rows.append(
            f"| {race} | {role} | {result.positives[race]:,} | {rate * 100:.2f} % | {score} |"
        )
    return ["| race | role | positive laps | base rate | PR-AUC |", "|---|---|---|---|---|", *rows]


def render(label: str, config: TrainConfig, result: ModelResult) -> str:
    split = result.split
    lines = [
        f"# Model card: {label}",
        "",
        f"**Label** (per lap, horizon {config.horizon_laps} lap(s): predicted at the lap's "
        f"start): {DEFINITIONS[label]}",
        "",
        f"**Races**: {len(split.get('development', []))} development races (leave-one-race-out "
        f"cross-validation: hyper-parameters, threshold and champion are chosen there), "
        f"{len(split.get('test', []))} test races (season {config.test_season} unless named; "
        f"nothing in training or selection saw them), and the demo race "
        f"{', '.join(split.get('held_out', []))} held out of both.",
        "",
        f"**Status**: {result.status}. {result.reason}",
    ]
    if result.metrics:
        m = result.metrics
        lines += [
            "",
            "## Scores",
            "",
            f"Decision threshold {m['threshold']:.4f} (best F1 on the out-of-fold predictions); "
            "the stream raises an alert at it.",
            "",
            "| metric | XGBoost, test | baseline, test | XGBoost, CV | baseline, CV |",
            "|---|---|---|---|---|",
            *(
                f"| {n} | {m[f'test_{n}']:.4f} | {m[f'baseline_test_{n}']:.4f} "
                f"| {m[f'cv_{n}']:.4f} | {m[f'baseline_cv_{n}']:.4f} |"
                for n in METRICS
            ),
            "",
            f"Base rates: {m['test_base_rate'] * 100:.2f} % of test laps, "
            f"{m['dev_base_rate'] * 100:.2f} % of development laps.",
            "Confusion matrix on the test races: "
            + ", ".join(f"{k.upper()} {v:,}" for k, v in result.confusion.items()),
            "",
            "## Ablation (test PR-AUC without each feature group; reporting only)",
            "",
            "| without | test PR-AUC | the group's gain |",
            "|---|---|---|",
            *(
                f"| {group} | {score:.4f} | {m['test_pr_auc'] - score:+.4f} |"
                for group, score in result.ablation.items()
            ),
            "",
            f"Registered version {result.version}, alias `{result.alias}`, comparison line "
            f"`{result.params.get('comparison_line')}`.",
        ]
    lines += ["", "## Base rates and scores per race", "", *_rate_table(result)]
    lines += ["", "## Features (by group)", ""]
    lines += [
        f"- **{g}**: {', '.join(f'`{f}`' for f in names)}" for g, names in FEATURE_GROUPS.items()
    ]
    return "\n".join(lines) + "\n"
