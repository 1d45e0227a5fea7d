"""The model card: a Markdown artifact on each training run."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.ml.features import FEATURES
from pipeline.ml.labels import DEFINITIONS

if TYPE_CHECKING:
    from pipeline.ml.train import ModelResult, TrainConfig


def render(label: str, config: TrainConfig, result: ModelResult) -> str:
    rates = "\n".join(
        f"| {race} | {result.positives[race]:,} | {rate * 100:.3f} % |"
        for race, rate in result.base_rates.items()
    )
    lines = [
        f"# Model card: {label}",
        "",
        f"**Label** (horizon {config.horizon_s:g} s of session time): {DEFINITIONS[label]}",
        "",
        f"**Training races**: {', '.join(config.train_sessions)} (every "
        f"{config.sample_every}th sample per car, samples within a lap). "
        f"**Validation race**: {config.validation_session} (all samples within a lap; "
        "never trained on; also the demo stream).",
        "",
        "## Base rates",
        "",
        "| race | positive samples | base rate |",
        "|---|---|---|",
        rates,
        "",
        f"**Status**: {result.status}. {result.reason}",
    ]
    if result.metrics:
        m = result.metrics
        names = ("accuracy", "precision", "recall", "f1", "roc_auc", "pr_auc", "brier")
        lines += [
            "",
            "## Validation",
            "",
            f"Threshold {m['threshold']:.4f} (best F1 on out-of-fold predictions of the "
            "training races, cross-validated by car and race).",
            "",
            "| metric | XGBoost | baseline (logistic regression) | cross-validation |",
            "|---|---|---|---|",
            *(
                f"| {n} | {m[f'val_{n}']:.4f} | {m[f'baseline_val_{n}']:.4f} | {m[f'cv_{n}']:.4f} |"
                for n in names
            ),
            "",
            "Confusion matrix on the validation race: "
            + ", ".join(f"{k.upper()} {v:,}" for k, v in result.confusion.items()),
            "",
            f"Registered version {result.version}, alias `{result.alias}`.",
        ]
    lines += ["", "## Features", "", ", ".join(f"`{f}`" for f in FEATURES), ""]
    return "\n".join(lines)
