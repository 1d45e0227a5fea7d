"""Train, evaluate, track and register the three models (`f1 train`, DAG f1_train).

The data: one row per lap of every race the FastF1 caches hold (`pipeline.ml.laps`),
its features as known at the lap's start (`pipeline.ml.features`), its labels
(`pipeline.ml.labels`: the event on this lap, or within `horizon_laps`).

An evaluation that cannot flatter:
- the races split three ways: *test* races (by default the 2024 season) that
  nothing in training or selection sees; the demo race (`DEMO_SESSION`), kept
  out of everything so the live scores of the demo are out of sample too; and
  the *development* races, everything else;
- every choice is made on leave-one-race-out cross-validation of the
  development races (each race predicted by models that never saw it, so
  race-wide effects such as safety cars and weather never sit on both sides):
  the hyper-parameters (a small grid), the decision threshold (best F1 on the
  out-of-fold predictions) and the champion (by cross-validated PR-AUC);
- the test races are scored once, by the chosen model and by the baseline
  (logistic regression on the same features, chosen the same way), and that is
  the score reported, with the base rates, per race, and an ablation (the test
  PR-AUC without each feature group: reporting only, never selection).

A version competes with the champion only when its label definition, horizon
and races are the same (their digest is the run's `comparison_line`); otherwise
it starts a new line of comparison and says so. Everything goes to MLflow.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.ml.features import FEATURE_GROUPS, FEATURES, in_domain, lap_table_features
from pipeline.ml.labels import DEFAULT_HORIZON_LAPS, DEFINITIONS, LABELS, lap_labels
from pipeline.ml.laps import Race, available_races, base_rates, lap_tables, season
from pipeline.settings import Settings, get_settings

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

log = logging.getLogger(__name__)

PRIMARY_METRIC = "cv_pr_auc"  # what the champion is chosen by: validation folds only
CHAMPION, CHALLENGER = "champion", "challenger"
MIN_POSITIVE_RACES = 2  # a label seen in fewer development races cannot be validated


def registered_name(label: str, settings: Settings) -> str:
    """The model's name in the registry, also its MLflow experiment's: `<prefix>-pit-stop`
    etc., the prefix from the settings (`f1`; tests use one of their own)."""
    return f"{settings.model_name_prefix}-{label.replace('_', '-')}"


@dataclass(frozen=True)
class TrainConfig:
    races: tuple[str, ...] = ()  # race keys to use; empty: every race the caches hold
    test_season: int = 2024  # its races are the test races (unless test_races names them)
    test_races: tuple[str, ...] = ()
    horizon_laps: int = DEFAULT_HORIZON_LAPS
    # XGBoost candidates (max_depth, trees, learning rate), chosen between on the folds.
    grid: tuple[tuple[int, int, float], ...] = ((3, 300, 0.05), (5, 300, 0.05))
    seed: int = 7

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """From JSON (e.g. an Airflow XCom), where tuples arrive as lists."""
        fixed: dict[str, Any] = dict(values)
        for key in ("races", "test_races"):
            if key in fixed:
                fixed[key] = tuple(fixed[key])
        if "grid" in fixed:
            fixed["grid"] = tuple(tuple(g) for g in fixed["grid"])
        return cls(**fixed)


@dataclass(frozen=True)
class RaceSplit:
    development: tuple[str, ...]
    test: tuple[str, ...]
    held_out: str  # the demo race: in neither


def split_races(config: TrainConfig, settings: Settings) -> tuple[RaceSplit, list[Race]]:
    """The development and test races of `config`, or one clear error."""
    known = {race.key: race for race in available_races(settings)}
    wanted = list(config.races) or list(known)
    missing = [key for key in [*wanted, *config.test_races] if key not in known]
    if missing:
        raise ValueError(
            f"no lap data for {missing}: the caches ({settings.fastf1_laps_cache_dir}, "
            f"{settings.fastf1_cache_dir}) hold {len(known)} races, e.g. {sorted(known)[:3]}"
        )
    demo = settings.demo_session
    test = list(config.test_races) or [k for k in wanted if season(k) == config.test_season]
    test = [k for k in test if k != demo]
    development = [k for k in wanted if k not in test and k != demo]
    if len(development) < 2 or not test:
        raise ValueError(
            f"{len(development)} development and {len(test)} test races (demo race {demo} "
            "held out): leave-one-race-out needs 2 development races and a test race; "
            "choose races or test_races so"
        )
    races = [known[k] for k in dict.fromkeys([*development, *test])]
    return RaceSplit(tuple(development), tuple(test), demo), races


@dataclass
class LapData:
    races: pd.Series  # race key per row: the cross-validation groups
    features: pd.DataFrame
    labels: pd.DataFrame  # one column per model

    def __len__(self) -> int:
        return len(self.features)


def build_data(
    races: list[Race],
    horizon_laps: int,
    settings: Settings,
    on_race: Callable[[Race], None] = lambda race: None,
) -> LapData:
    """Every in-domain lap of `races` (lap tables built once, then read back)."""
    table = lap_tables(races, settings, on_race=on_race)
    features = lap_table_features(table)
    labels = lap_labels(table, horizon_laps)
    keep = in_domain(features) & ~table["red_flag"].to_numpy(dtype=bool)
    return LapData(
        table.loc[keep, "race"].reset_index(drop=True),
        features[keep].reset_index(drop=True),
        labels[keep].reset_index(drop=True),
    )


@dataclass
class ModelResult:
    label: str
    status: str  # registered | not learnable
    base_rates: dict[str, float]
    positives: dict[str, int]
    split: dict[str, list[str]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    confusion: dict[str, int] = field(default_factory=dict)
    cv_by_race: dict[str, float] = field(default_factory=dict)
    test_by_race: dict[str, float] = field(default_factory=dict)
    ablation: dict[str, float] = field(default_factory=dict)  # group -> test PR-AUC without it
    params: dict[str, Any] = field(default_factory=dict)
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


# What each label implies, built in: for the same state, older tyres never make a
# stop or a cliff less likely (tests/integration/test_ml.py checks the served model).
MONOTONE = {"pit_stop": {"tyre_life": 1}, "tire_failure": {"tyre_life": 1}, "crash_risk": {}}


def _xgboost(
    candidate: tuple[int, int, float], seed: int, label: str, features: Sequence[str] = FEATURES
) -> Any:
    from xgboost import XGBClassifier

    depth, trees, rate = candidate
    monotone = {f: d for f, d in MONOTONE[label].items() if f in features}
    return XGBClassifier(
        n_estimators=trees, max_depth=depth, learning_rate=rate, tree_method="hist", n_jobs=2,
        random_state=seed, eval_metric="aucpr", monotone_constraints=monotone or None,
    )  # fmt: skip


def _baseline() -> Any:
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(
        SimpleImputer(strategy="median"), StandardScaler(), LogisticRegression(max_iter=1000)
    )


def leave_one_race_out(
    make: Callable[[], Any], x: pd.DataFrame, y: np.ndarray, races: pd.Series
) -> np.ndarray:
    """Out-of-fold probabilities: each race predicted by a model trained on the others."""
    import numpy as np
    from sklearn.model_selection import LeaveOneGroupOut

    oof = np.zeros(len(y))
    for train, held in LeaveOneGroupOut().split(x, y, races):
        if y[train].sum() == 0:  # nothing to learn from: no alarm
            continue
        oof[held] = make().fit(x.iloc[train], y[train]).predict_proba(x.iloc[held])[:, 1]
    return oof


def _by_race(y: np.ndarray, p: np.ndarray, races: pd.Series) -> dict[str, float]:
    """PR-AUC per race (races without a positive have none)."""
    from sklearn.metrics import average_precision_score

    out = {}
    for race in dict.fromkeys(races.tolist()):
        mask = (races == race).to_numpy()
        if y[mask].sum():
            out[race] = float(average_precision_score(y[mask], p[mask]))
    return out


def comparison_line(label: str, config: TrainConfig, split: RaceSplit) -> str:
    """What makes two versions' scores comparable: label definition, horizon, races."""
    basis = {"label": label, "definition": DEFINITIONS[label], "horizon_laps": config.horizon_laps,
             "development": sorted(split.development), "test": sorted(split.test)}  # fmt: skip
    return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()[:12]


def prepare(
    config: TrainConfig, settings: Settings, on_race: Callable[[Race], None] = lambda r: None
) -> tuple[RaceSplit, LapData]:
    split, races = split_races(config, settings)
    return split, build_data(races, config.horizon_laps, settings, on_race)


def train_all(
    config: TrainConfig | None = None,
    *,
    labels: tuple[str, ...] = LABELS,
    settings: Settings | None = None,
    on_race: Callable[[Race], None] = lambda race: None,
) -> list[ModelResult]:
    config = config or TrainConfig()
    settings = settings or get_settings()
    split, data = prepare(config, settings, on_race)
    return [train_one(label, data, split, config, settings) for label in labels]


def train_one(
    label: str, data: LapData, split: RaceSplit, config: TrainConfig, settings: Settings
) -> ModelResult:
    import mlflow
    import numpy as np

    dev = data.races.isin(split.development).to_numpy()
    test = data.races.isin(split.test).to_numpy()
    x_dev, x_test = data.features[dev], data.features[test]
    y_all = data.labels[label].to_numpy()
    y_dev, y_test = y_all[dev], y_all[test]
    races_dev, races_test = data.races[dev], data.races[test]
    rates = base_rates(data.races.to_frame("race"), data.labels)
    result = ModelResult(
        label,
        "registered",
        {str(race): float(v) for race, v in rates[f"{label}_rate"].items()},
        {str(race): int(v) for race, v in rates[f"{label}_positives"].items()},
        split={"development": list(split.development), "test": list(split.test),
               "held_out": [split.held_out]},
    )  # fmt: skip
    line = comparison_line(label, config, split)
    result.params = {
        **asdict(config), "label": label, "label_definition": DEFINITIONS[label],
        "features": ",".join(FEATURES), "comparison_line": line,
        "development_races": len(split.development), "test_races_n": len(split.test),
        "held_out_race": split.held_out, "cv": "leave-one-race-out",
        "development_laps": int(dev.sum()), "test_laps": int(test.sum()),
    }  # fmt: skip

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_experiment(registered_name(label, settings))
    with mlflow.start_run(run_name=f"{label} h={config.horizon_laps} lap(s)") as run:
        result.run_id = run.info.run_id
        mlflow.log_params({k: str(v)[:500] for k, v in result.params.items()})
        mlflow.set_tag("comparison_line", line)
        mlflow.log_metrics({"dev_base_rate": float(y_dev.mean()),
                            "test_base_rate": float(y_test.mean()),
                            "dev_positives": int(y_dev.sum()),
                            "test_positives": int(y_test.sum())})  # fmt: skip
        carriers = races_dev[y_dev == 1].nunique()
        if carriers < MIN_POSITIVE_RACES or not y_test.sum():
            result.status = "not learnable"
            result.reason = (
                f"{int(y_dev.sum())} positive laps in {carriers} development race(s) and "
                f"{int(y_test.sum())} in the test races: too rare to learn, validate or test"
            )
            mlflow.set_tag("status", result.status)
            mlflow.set_tag("reason", result.reason)
            _log_tables(result, rates)
            _log_card(label, config, result)
            return result

        # Selection, on the development races' folds only.
        candidates = {}
        for candidate in config.grid:
            oof = leave_one_race_out(
                functools.partial(_xgboost, candidate, config.seed, label), x_dev, y_dev, races_dev
            )
            candidates[candidate] = (scores(y_dev, oof, 0.5, "")["pr_auc"], oof)
            log.info("%s %s: cv PR-AUC %.4f", label, candidate, candidates[candidate][0])
        chosen = max(candidates, key=lambda c: candidates[c][0])
        oof = candidates[chosen][1]
        oof_base = leave_one_race_out(_baseline, x_dev, y_dev, races_dev)
        threshold = best_threshold(y_dev, oof)
        threshold_base = best_threshold(y_dev, oof_base)
        result.cv_by_race = _by_race(y_dev, oof, races_dev)

        # The report, on the test races: one fit on every development race.
        model = _xgboost(chosen, config.seed, label).fit(x_dev, y_dev)
        baseline = _baseline().fit(x_dev, y_dev)
        p_test = model.predict_proba(x_test)[:, 1]
        p_base = baseline.predict_proba(x_test)[:, 1]
        result.test_by_race = _by_race(y_test, p_test, races_test)
        metrics = {
            **scores(y_dev, oof, threshold, "cv_"),
            **scores(y_dev, oof_base, threshold_base, "baseline_cv_"),
            **scores(y_test, p_test, threshold, "test_"),
            **scores(y_test, p_base, threshold_base, "baseline_test_"),
            "threshold": threshold,
            "baseline_threshold": threshold_base,
            "dev_base_rate": float(y_dev.mean()),
            "test_base_rate": float(y_test.mean()),
            **{f"grid_{d}x{t}x{r:g}_cv_pr_auc": s for (d, t, r), (s, _) in candidates.items()},
        }
        metrics["test_pr_auc_gain_over_baseline"] = (
            metrics["test_pr_auc"] - metrics["baseline_test_pr_auc"]
        )
        result.ablation = _ablation(label, chosen, config, x_dev, y_dev, x_test, y_test)
        metrics.update({f"ablation_without_{g}_test_pr_auc": v for g, v in result.ablation.items()})
        result.metrics = {k: float(v) for k, v in metrics.items()}
        mlflow.log_params({"chosen_max_depth": chosen[0], "chosen_trees": chosen[1],
                           "chosen_learning_rate": chosen[2]})  # fmt: skip
        mlflow.log_metrics({k: v for k, v in result.metrics.items() if np.isfinite(v)})
        predicted = p_test >= threshold
        result.confusion = {
            "tn": int(((~predicted) & (y_test == 0)).sum()),
            "fp": int((predicted & (y_test == 0)).sum()),
            "fn": int(((~predicted) & (y_test == 1)).sum()),
            "tp": int((predicted & (y_test == 1)).sum()),
        }
        _log_plots(label, model, y_test, p_test, threshold, result)
        _log_tables(result, rates)
        booster = model.get_booster()
        booster.set_attr(threshold=str(threshold), label=label,
                         horizon_laps=str(config.horizon_laps), comparison_line=line)  # fmt: skip
        _register(label, booster, x_test, p_test, result, settings)
        _log_card(label, config, result)
    return result


def _ablation(
    label: str,
    chosen: tuple[int, int, float],
    config: TrainConfig,
    x_dev: pd.DataFrame,
    y_dev: np.ndarray,
    x_test: pd.DataFrame,
    y_test: np.ndarray,
) -> dict[str, float]:
    """Test PR-AUC of the chosen model trained without each feature group."""
    out = {}
    for group, names in FEATURE_GROUPS.items():
        kept = [f for f in FEATURES if f not in names]
        model = _xgboost(chosen, config.seed, label, kept).fit(x_dev[kept], y_dev)
        out[group] = scores(y_test, model.predict_proba(x_test[kept])[:, 1], 0.5, "")["pr_auc"]
    return out


def needs_training(settings: Settings) -> list[str]:
    """The models without a champion the stream can serve: none yet, or one trained
    on other features (an older release's)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(settings.mlflow_tracking_uri)
    wanted = []
    for label in LABELS:
        try:
            champion = client.get_model_version_by_alias(registered_name(label, settings), CHAMPION)
            features = client.get_run(str(champion.run_id)).data.params.get("features")
        except MlflowException:  # no model, or no champion yet
            features = None
        if features != ",".join(FEATURES):
            wanted.append(label)
    return wanted


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
    example_rows: pd.DataFrame,
    p_example: np.ndarray,
    result: ModelResult,
    settings: Settings,
) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import infer_signature

    name = registered_name(label, settings)
    example = example_rows.head(5)
    info = mlflow.xgboost.log_model(
        booster, name="model", model_format="ubj", registered_model_name=name,
        signature=infer_signature(example, p_example[:5]), input_example=example,
    )  # fmt: skip
    result.version = str(info.registered_model_version)
    client = mlflow.MlflowClient(settings.mlflow_tracking_uri)
    line = result.params["comparison_line"]
    score = result.metrics[PRIMARY_METRIC]
    baseline = result.metrics["baseline_cv_pr_auc"]
    rival, rival_score, other_line = "", float("-inf"), ""
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
        champion_run = client.get_run(str(current.run_id)).data
        if champion_run.params.get("features") != ",".join(FEATURES):
            other_line = f"v{current.version} was trained on other features"
        elif champion_run.params.get("comparison_line") != line:
            other_line = (
                f"v{current.version} has another label definition, horizon or races "
                f"(line {champion_run.params.get('comparison_line', 'none')}, this one {line})"
            )
        else:
            rival = f"champion v{current.version}"
            rival_score = champion_run.metrics.get(PRIMARY_METRIC, float("-inf"))
    except MlflowException:  # no champion yet
        pass
    if score > baseline and score > rival_score:
        result.alias = CHAMPION
        result.reason = f"cross-validated PR-AUC {score:.4f} beats the baseline ({baseline:.4f})"
        result.reason += f" and {rival} ({rival_score:.4f})" if rival else ""
        result.reason += f"; starts a new line of comparison: {other_line}" if other_line else ""
    else:
        result.alias = CHALLENGER
        result.reason = f"cross-validated PR-AUC {score:.4f} does not beat " + (
            f"the baseline ({baseline:.4f})"
            if score <= baseline
            else f"{rival} ({rival_score:.4f})"
        )
    client.set_registered_model_alias(name, result.alias, result.version)
    client.update_model_version(name, result.version, description=result.reason)
    mlflow.set_tag("alias", result.alias)
    log.info("%s v%s -> %s: %s", name, result.version, result.alias, result.reason)


def _log_tables(result: ModelResult, rates: pd.DataFrame) -> None:
    """Per race: base rates, cross-validated and test PR-AUC (CSV), and a plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow
    import pandas as pd

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        per_race = rates.assign(
            role=lambda f: [
                "test" if r in result.split["test"] else "development" for r in f.index
            ],
            cv_pr_auc=pd.Series(result.cv_by_race),
            test_pr_auc=pd.Series(result.test_by_race),
        )
        per_race.rename_axis("race").to_csv(folder / "races.csv")
        if result.cv_by_race or result.test_by_race:
            scored = pd.Series({**result.cv_by_race, **result.test_by_race}).sort_values()
            colours = [
                "tab:orange" if r in result.test_by_race else "tab:blue" for r in scored.index
            ]
            fig, ax = plt.subplots(figsize=(7, max(4, len(scored) * 0.18)))
            ax.barh(scored.index, scored.to_numpy(), color=colours)
            rate = rates[f"{result.label}_rate"].reindex(scored.index)
            ax.scatter(rate.to_numpy(), scored.index, color="black", s=8, label="base rate")
            ax.set(xlabel="PR-AUC (blue: left-out race in CV; orange: test race)",
                   title=f"{result.label}: per race")  # fmt: skip
            ax.tick_params(axis="y", labelsize=6)
            ax.legend(loc="lower right")
            fig.tight_layout()
            fig.savefig(folder / "per_race_pr_auc.png", dpi=110)
            plt.close(fig)
        mlflow.log_artifacts(str(folder))


def _log_plots(
    label: str,
    model: Any,
    y_test: np.ndarray,
    p_test: np.ndarray,
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
               title=f"{label}, test races\nthreshold {threshold:.3f}")  # fmt: skip
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
        if y_test.sum():
            true, predicted = calibration_curve(y_test, p_test, n_bins=10, strategy="quantile")
            ax.plot(predicted, true, marker="o", label="XGBoost")
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect")
        ax.set(xlabel="predicted probability", ylabel="observed rate",
               title=f"{label}: calibration on the test races")  # fmt: skip
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
