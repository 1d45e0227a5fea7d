"""Train, evaluate, track and register the three models (`f1 train`, DAG f1_train).

Per label: XGBoost and a baseline (logistic regression on the same features)
are trained the same way on the training races, cross-validated with folds
grouped by car-and-race (one car's samples in one race never sit on both sides),
and scored on the validation race, which is never trained on. The decision
threshold is the one that maximizes F1 on the out-of-fold predictions, so the
validation race does not choose it. Everything goes to MLflow: one experiment
per model, the same metric names in every run; the model is registered and
gets the alias `champion` only when it beats both the current champion and the
baseline on validation PR-AUC (the fair score for rare labels), else `challenger`.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.ml import dataset as datasets
from pipeline.ml.features import FEATURES
from pipeline.ml.labels import DEFAULT_HORIZON_S, LABELS
from pipeline.settings import Settings, get_settings

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

log = logging.getLogger(__name__)

PRIMARY_METRIC = "val_pr_auc"
CHAMPION, CHALLENGER = "champion", "challenger"


def registered_name(label: str, settings: Settings) -> str:
    """The model's name in the registry, also its MLflow experiment's: `<prefix>-pit-stop`
    etc., the prefix from the settings (`f1`; tests use one of their own)."""
    return f"{settings.model_name_prefix}-{label.replace('_', '-')}"


@dataclass(frozen=True)
class TrainConfig:
    train_sessions: tuple[str, ...] = ("2021_Monaco_R", "2024_Monaco_R")
    validation_session: str = "2023_Monaco_R"
    horizon_s: float = DEFAULT_HORIZON_S
    sample_every: int = 4  # 1 Hz of the 4 Hz feed: neighbours add little, cost a lot
    n_estimators: int = 200
    max_depth: int = 5
    learning_rate: float = 0.08
    cv_folds: int = 4
    seed: int = 7

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """From JSON (e.g. an Airflow XCom), where tuples arrive as lists."""
        return cls(**{**values, "train_sessions": tuple(values["train_sessions"])})


@dataclass
class ModelResult:
    label: str
    status: str  # registered | not learnable
    base_rates: dict[str, float]
    positives: dict[str, int]
    metrics: dict[str, float] = field(default_factory=dict)
    confusion: dict[str, int] = field(default_factory=dict)
    version: str | None = None
    alias: str | None = None
    run_id: str | None = None
    reason: str = ""


def scores(y: np.ndarray, p: np.ndarray, threshold: float, prefix: str) -> dict[str, float]:
    import numpy as np
    from sklearn import metrics

    predicted = p >= threshold
    both = len(np.unique(y)) == 2
    return {
        f"{prefix}accuracy": metrics.accuracy_score(y, predicted),
        f"{prefix}precision": metrics.precision_score(y, predicted, zero_division=0),
        f"{prefix}recall": metrics.recall_score(y, predicted, zero_division=0),
        f"{prefix}f1": metrics.f1_score(y, predicted, zero_division=0),
        f"{prefix}roc_auc": metrics.roc_auc_score(y, p) if both else float("nan"),
        f"{prefix}pr_auc": metrics.average_precision_score(y, p) if both else float("nan"),
        f"{prefix}brier": metrics.brier_score_loss(y, p),
    }


def best_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The threshold with the best F1 on (out-of-fold) predictions."""
    import numpy as np
    from sklearn.metrics import precision_recall_curve

    if y.sum() == 0:
        return 0.5
    precision, recall, thresholds = precision_recall_curve(y, p)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return float(thresholds[int(np.argmax(f1[:-1]))])


def _xgboost(config: TrainConfig) -> Any:
    from xgboost import XGBClassifier

    return XGBClassifier(
        n_estimators=config.n_estimators, max_depth=config.max_depth,
        learning_rate=config.learning_rate, tree_method="hist", n_jobs=2,
        random_state=config.seed, eval_metric="aucpr",
    )  # fmt: skip


def _baseline() -> Any:
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(
        SimpleImputer(strategy="median"), StandardScaler(), LogisticRegression(max_iter=500)
    )


def _out_of_fold(make: Any, x: pd.DataFrame, y: np.ndarray, groups: Any, folds: int) -> np.ndarray:
    import numpy as np
    from sklearn.model_selection import GroupKFold

    oof = np.zeros(len(y))
    for train, test in GroupKFold(n_splits=folds).split(x, y, groups):
        if y[train].sum() == 0:  # a fold without positives learns nothing: predict the rate
            oof[test] = 0.0
            continue
        oof[test] = make().fit(x.iloc[train], y[train]).predict_proba(x.iloc[test])[:, 1]
    return oof


def build_datasets(
    config: TrainConfig, settings: Settings
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(training data, validation data) for every label at once."""
    train = datasets.concat(
        [datasets.build(k, horizon_s=config.horizon_s, sample_every=config.sample_every,
                        settings=settings) for k in config.train_sessions]
    )  # fmt: skip
    validation = datasets.build(
        config.validation_session, horizon_s=config.horizon_s, sample_every=1, settings=settings
    )
    return train, validation


def save_datasets(config: TrainConfig, folder: Path, settings: Settings | None = None) -> Path:
    """Build the data once and write it for several training processes (the DAG's
    mapped tasks) to share, instead of each building it again."""
    train, validation = build_datasets(config, settings or get_settings())
    datasets.save(train, folder / "train.parquet")
    datasets.save(validation, folder / "validation.parquet")
    return folder


def train_all(
    config: TrainConfig | None = None,
    *,
    labels: tuple[str, ...] = LABELS,
    settings: Settings | None = None,
    data_folder: Path | None = None,
) -> list[ModelResult]:
    """Train `labels` on data built now, or read from `data_folder` (`save_datasets`)."""
    config = config or TrainConfig()
    settings = settings or get_settings()
    if data_folder is None:
        train, validation = build_datasets(config, settings)
    else:
        train = datasets.load(data_folder / "train.parquet")
        validation = datasets.load(data_folder / "validation.parquet")
    return [train_one(label, train, validation, config, settings) for label in labels]


def train_one(
    label: str,
    train: datasets.Dataset,
    validation: datasets.Dataset,
    config: TrainConfig,
    settings: Settings,
) -> ModelResult:
    import mlflow
    import numpy as np

    y_train = train.labels[label].to_numpy()
    y_val = validation.labels[label].to_numpy()
    by_race = {
        key: train.labels.loc[train.groups.str.startswith(f"{key}:"), label]
        for key in config.train_sessions
    }
    per_race = {key: float(y.mean()) for key, y in by_race.items()}
    per_race[validation.session_key] = float(y_val.mean())
    positives = {key: int(y.sum()) for key, y in by_race.items()}
    positives[validation.session_key] = int(y_val.sum())
    result = ModelResult(label, "registered", per_race, positives)

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_experiment(registered_name(label, settings))
    with mlflow.start_run(run_name=f"{label} h={config.horizon_s:g}s") as run:
        result.run_id = run.info.run_id
        mlflow.log_params(
            {**asdict(config), "label": label, "features": ",".join(FEATURES),
             "train_rows": len(train), "validation_rows": len(validation)}
        )  # fmt: skip
        mlflow.log_metrics({"train_base_rate": float(y_train.mean()),
                            "val_base_rate": float(y_val.mean()),
                            "train_positives": int(y_train.sum()),
                            "val_positives": int(y_val.sum())})  # fmt: skip
        carriers = train.groups[y_train == 1].nunique()
        if y_train.sum() == 0 or carriers < 2:
            result.status = "not learnable"
            result.reason = (
                f"{int(y_train.sum())} positive samples from {carriers} car(s) in the training "
                f"races ({', '.join(config.train_sessions)}): too rare to learn or to validate"
            )
            mlflow.set_tag("status", result.status)
            mlflow.set_tag("reason", result.reason)
            _log_card(label, config, result)
            return result

        folds = min(config.cv_folds, train.groups.nunique())
        oof = _out_of_fold(lambda: _xgboost(config), train.features, y_train, train.groups, folds)
        oof_base = _out_of_fold(_baseline, train.features, y_train, train.groups, folds)
        threshold = best_threshold(y_train, oof)
        threshold_base = best_threshold(y_train, oof_base)

        model = _xgboost(config).fit(train.features, y_train)
        baseline = _baseline().fit(train.features, y_train)
        p_val = model.predict_proba(validation.features)[:, 1]
        p_base = baseline.predict_proba(validation.features)[:, 1]
        metrics = {
            **scores(y_train, oof, threshold, "cv_"),
            **scores(y_val, p_val, threshold, "val_"),
            **scores(y_val, p_base, threshold_base, "baseline_val_"),
            "threshold": threshold,
            "baseline_threshold": threshold_base,
        }
        metrics["val_pr_auc_gain_over_baseline"] = (
            metrics["val_pr_auc"] - metrics["baseline_val_pr_auc"]
        )
        result.metrics = {k: float(v) for k, v in metrics.items()}
        mlflow.log_metrics({k: v for k, v in result.metrics.items() if np.isfinite(v)})
        predicted = p_val >= threshold
        result.confusion = {
            "tn": int(((~predicted) & (y_val == 0)).sum()),
            "fp": int((predicted & (y_val == 0)).sum()),
            "fn": int(((~predicted) & (y_val == 1)).sum()),
            "tp": int((predicted & (y_val == 1)).sum()),
        }
        _log_plots(label, model, validation, y_val, p_val, threshold, result)
        booster = model.get_booster()
        booster.set_attr(threshold=str(threshold), label=label)
        _register(label, booster, validation, p_val, result, settings)
        _log_card(label, config, result)
    return result


def registered_versions(settings: Settings) -> dict[str, int]:
    """How many versions each model has in the registry."""
    import mlflow

    client = mlflow.MlflowClient(settings.mlflow_tracking_uri)
    return {
        label: len(client.search_model_versions(f"name = '{registered_name(label, settings)}'"))
        for label in LABELS
    }


def _register(
    label: str,
    booster: Any,
    validation: datasets.Dataset,
    p_val: np.ndarray,
    result: ModelResult,
    settings: Settings,
) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import infer_signature

    name = registered_name(label, settings)
    example = validation.features.head(5)
    info = mlflow.xgboost.log_model(
        booster, name="model", model_format="ubj", registered_model_name=name,
        signature=infer_signature(example, p_val[:5]), input_example=example,
    )  # fmt: skip
    result.version = str(info.registered_model_version)
    client = mlflow.MlflowClient(settings.mlflow_tracking_uri)
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
        champion_run = client.get_run(str(current.run_id)).data
        champion = f"champion v{current.version}"
        champion_score = champion_run.metrics.get(PRIMARY_METRIC, 0.0)
        if champion_run.params.get("features") != ",".join(FEATURES):
            # Trained on other features: the stream cannot serve it, so it is no rival.
            champion, champion_score = "", float("-inf")
    except MlflowException:  # no champion yet
        champion, champion_score = "", float("-inf")
    score = result.metrics[PRIMARY_METRIC]
    baseline = result.metrics["baseline_val_pr_auc"]
    if score > baseline and score > champion_score:
        result.alias = CHAMPION
        result.reason = f"validation PR-AUC {score:.4f} beats the baseline ({baseline:.4f})" + (
            f" and {champion} ({champion_score:.4f})" if champion else ""
        )
    else:
        result.alias = CHALLENGER
        result.reason = f"validation PR-AUC {score:.4f} does not beat " + (
            f"the baseline ({baseline:.4f})"
            if score <= baseline
            else f"{champion} ({champion_score:.4f})"
        )
    client.set_registered_model_alias(name, result.alias, result.version)
    client.update_model_version(name, result.version, description=result.reason)
    mlflow.set_tag("alias", result.alias)
    log.info("%s v%s -> %s: %s", name, result.version, result.alias, result.reason)


def _log_plots(
    label: str,
    model: Any,
    validation: datasets.Dataset,
    y_val: np.ndarray,
    p_val: np.ndarray,
    threshold: float,
    result: ModelResult,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow
    import pandas as pd
    from sklearn.calibration import calibration_curve

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        c = result.confusion
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.imshow([[c["tn"], c["fp"]], [c["fn"], c["tp"]]], cmap="Blues")
        for (i, j), v in {
            (0, 0): c["tn"],
            (0, 1): c["fp"],
            (1, 0): c["fn"],
            (1, 1): c["tp"],
        }.items():
            ax.text(j, i, f"{v:,}", ha="center", va="center")
        ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["no", "yes"], yticklabels=["no", "yes"],
               xlabel="predicted", ylabel="actual",
               title=f"{label}, {validation.session_key}\nthreshold {threshold:.3f}")  # fmt: skip
        fig.tight_layout()
        fig.savefig(folder / "confusion_matrix.png", dpi=110)
        plt.close(fig)

        importance = pd.Series(model.feature_importances_, index=list(FEATURES)).sort_values()
        importance.to_csv(folder / "feature_importance.csv", header=["gain_share"])
        fig, ax = plt.subplots(figsize=(6, 6))
        importance.plot.barh(ax=ax, title=f"{label}: feature importance")
        fig.tight_layout()
        fig.savefig(folder / "feature_importance.png", dpi=110)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(5, 5))
        if y_val.sum():
            true, predicted = calibration_curve(y_val, p_val, n_bins=10, strategy="quantile")
            ax.plot(predicted, true, marker="o", label="XGBoost")
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect")
        ax.set(xlabel="predicted probability", ylabel="observed rate",
               title=f"{label}: calibration on {validation.session_key}")  # fmt: skip
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "calibration.png", dpi=110)
        plt.close(fig)
        (folder / "confusion_matrix.json").write_text(json.dumps(c))
        mlflow.log_artifacts(str(folder))


def _log_card(label: str, config: TrainConfig, result: ModelResult) -> None:
    import mlflow

    from pipeline.ml.model_card import render

    mlflow.log_text(render(label, config, result), "model_card.md")
