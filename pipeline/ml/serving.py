"""Serving the champions in the consumer: one native XGBoost Booster per model,
one `inplace_predict` call per model per batch, on one thread.

The models are lap-level: every sample of a car's lap carries the same features
(`pipeline.ml.features`), so a batch of 5,000 samples holds a few dozen distinct
rows. Each call predicts those only (`distinct_runs`) and the samples take their
row's probability: the same numbers as predicting every sample, for a few
dozen rows' work instead of thousands.

Every `refresh_s` a background thread asks the registry where `champion` points
(the hot path never waits on it); when it moves,
the new version is loaded and checked (its features must be ones the stream
computes, FEATURES) before it replaces the old one, so a bad version never
serves and the stream never stops. A model without a champion yet serves
nothing (its columns stay NULL) and says so once, clearly.

Each version carries its decision threshold (tuned on the training folds, a
Booster attribute): a prediction at or above it is an alert (`<label>_alert`),
which the live page and the dashboards show. Samples outside the models'
domain (no lap: grid, garage, after the flag; a stopped race) are not scored:
`in_domain` false, probabilities NULL ("not applicable", not a guess).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.ml.features import FEATURES, in_domain
from pipeline.ml.labels import LABELS
from pipeline.ml.train import CHALLENGER, CHAMPION, registered_name
from pipeline.settings import Settings

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from pipeline.processing.columns import Columns

log = logging.getLogger(__name__)


class FeatureMismatch(ValueError):
    pass


@dataclass
class Served:
    version: str
    booster: Any
    features: list[str]
    threshold: float

    @property
    def columns(self) -> list[int]:
        """The model's features as positions in FEATURES (the batch's feature matrix)."""
        return [FEATURES.index(name) for name in self.features]


def load_booster(uri: str, settings: Settings) -> Any:
    """A registered model as a native Booster on one thread, checked against FEATURES
    (it may use fewer; it must not need one the stream does not compute)."""
    import os

    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # not in the logs
    # The registry to resolve `models:/` against is the project's server, never a local store.
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(settings.mlflow_tracking_uri)
    booster = mlflow.xgboost.load_model(uri)
    booster = getattr(booster, "get_booster", lambda: booster)()
    unknown = [f for f in booster.feature_names or [None] if f not in FEATURES]
    if unknown:
        raise FeatureMismatch(
            f"{uri} expects features {unknown} the stream does not compute (it computes "
            f"{list(FEATURES)}); retrain it with the current code (f1 train)."
        )
    booster.set_param({"nthread": 1})  # one thread per model call: no oversubscription
    return booster


def distinct_runs(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`matrix`'s rows with each run of equal consecutive rows taken once, and for
    every row the position of its run: `matrix == distinct[runs]`. Equal means the
    same bits (NaN included), so a model gives a run's rows one answer. One pass
    over the rows, no sort: a batch comes grouped by car, so a lap's samples run
    together (a row repeated apart from its run is only predicted twice)."""
    import numpy as np

    if len(matrix) < 2:
        return matrix, np.zeros(len(matrix), dtype=np.intp)
    bits = np.ascontiguousarray(matrix).view(f"u{matrix.dtype.itemsize}")
    starts = np.empty(len(matrix), dtype=bool)
    starts[0] = True
    np.any(bits[1:] != bits[:-1], axis=1, out=starts[1:])
    return matrix[starts], np.cumsum(starts) - 1


FOLLOWER = "champion-follower"  # the thread following the aliases


class ChampionScorer:
    """Scores a batch's features with every model's current champion, and its
    challenger in shadow (`<label>_challenger_p`), so both are scored live on
    the same stream (`pipeline.ml.live_scores`)."""

    def __init__(
        self,
        settings: Settings,
        labels: tuple[str, ...] = LABELS,
        *,
        shadow_challengers: bool = True,
    ) -> None:
        self.settings = settings
        self.labels = labels
        self.served: dict[str, Served] = {}  # label -> its champion
        # label -> its challenger, scored in shadow beside the champion (stored, not shown).
        self.shadow: dict[str, Served] = {}
        self.shadow_challengers = shadow_challengers
        self.refresh_s = settings.model_refresh_s
        self._checked_at = float("-inf")
        self._warned: set[str] = set()
        self._follower: threading.Thread | None = None
        self._stop_following = threading.Event()

    def _follow(self) -> None:
        """Background: follow the aliases, so no registry round trip sits in a batch."""
        import os

        # MLflow's client retries a refused connection for minutes by default: with
        # MLflow down, fail fast, say so, and ask again at the next refresh instead.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        while not self._stop_following.wait(self.refresh_s):
            try:
                self.refresh(force=True)
            except Exception:  # never let a registry hiccup end the follower
                log.exception("following the champions failed; retrying")

    def refresh(self, *, force: bool = False) -> None:
        """Follow the `champion` and `challenger` aliases (at most every refresh_s)."""
        import mlflow

        now = time.monotonic()
        if not force and now - self._checked_at < self.refresh_s:
            return
        self._checked_at = now
        client = mlflow.MlflowClient(self.settings.mlflow_tracking_uri)
        roles = [(CHAMPION, self.served)]
        if self.shadow_challengers:
            roles.append((CHALLENGER, self.shadow))
        for label in self.labels:
            # One registry call per model gives both aliases (this runs every
            # refresh_s beside the hot path: each call costs milliseconds of CPU).
            name = registered_name(label, self.settings)
            try:
                aliases = dict(client.get_registered_model(name).aliases)
            except Exception as err:
                code = getattr(err, "error_code", None)
                if code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                    for alias, store in roles:  # MLflow down (a refused connection too)
                        served = store.get(label)
                        self._warn_once(
                            f"{label}:{alias}:unreachable",
                            f"cannot reach the MLflow registry for {name} ({err}); "
                            + (f"still serving v{served.version}" if served else "serving nothing"),
                        )
                    continue
                aliases = {}  # no such model yet
            for alias, store in roles:
                self._follow_alias(label, alias, aliases.get(alias), store)

    def _follow_alias(
        self, label: str, alias: str, version: str | None, store: dict[str, Served]
    ) -> None:
        from mlflow.exceptions import MlflowException

        name = registered_name(label, self.settings)
        self._warned.discard(f"{label}:{alias}:unreachable")  # reached again: say so next time
        if version is None:
            store.pop(label, None)  # the alias was removed: stop serving it
            if alias == CHAMPION:
                self._warn_once(
                    label,
                    f"no {CHAMPION} for {name} yet: its predictions stay empty; "
                    "run `f1 train` or the f1_train DAG",
                )
            return
        current = store.get(label)
        if current and current.version == version:
            return
        try:
            booster = load_booster(f"models:/{name}/{version}", self.settings)
        except (FeatureMismatch, MlflowException, OSError) as err:
            self._warn_once(f"{label}:{version}", f"refusing {name} v{version}: {err}")
            return
        threshold = float(booster.attr("threshold") or 0.5)  # a model without one: 0.5
        store[label] = Served(version, booster, list(booster.feature_names), threshold)
        if alias == CHAMPION:
            self._warned.discard(label)
        log.info("serving %s v%s as %s%s", name, version, alias,
                 f" (was v{current.version})" if current else "")  # fmt: skip

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.error(message)

    @staticmethod
    def _columns(
        rows: dict[str, np.ndarray],
        label: str,
        served: Served | None,
        scored: tuple[np.ndarray, np.ndarray],
        domain: np.ndarray,
        role: str,
    ) -> None:
        """`<label><role>_p`, `_version` (and the champion's `_alert`) for the batch.
        `scored`: the in-domain rows' distinct features and each row's position
        among them (`distinct_runs`)."""
        import numpy as np

        n = len(domain)
        p = np.full(n, np.nan)
        distinct, runs = scored
        if served is not None and len(distinct):
            p[domain] = served.booster.inplace_predict(distinct[:, served.columns])[runs]
        rows[f"{label}{role}_p"] = p if served is not None else np.full(n, None, dtype=object)
        version = int(served.version) if served is not None else None
        rows[f"{label}{role}_version"] = np.full(n, version, dtype=int if version else object)
        if not role:  # alerts at the champion's own threshold; NULL where p is
            alert = (p >= (served.threshold if served else np.inf)).astype(object)
            alert[np.isnan(p)] = None
            rows[f"{label}_alert"] = alert

    def start(self) -> None:
        """Load the champions and start following their aliases (once). The
        consumer calls it before its first poll: importing MLflow and XGBoost and
        loading the models takes seconds, which would otherwise stall the first
        batch (and its samples' latency)."""
        if self._follower is None:
            self.refresh(force=True)
            self._stop_following.clear()
            self._follower = threading.Thread(target=self._follow, name=FOLLOWER, daemon=True)
            self._follower.start()

    def stop(self) -> None:
        """Stop following the aliases (`start` follows them again): a consumer that
        ends leaves no thread asking the registry behind in its process."""
        if self._follower is not None:
            self._stop_following.set()
            self._follower.join()
            self._follower = None

    def score(self, samples: pd.DataFrame | Columns, features: pd.DataFrame) -> Columns:
        """The batch's prediction columns, row for row with `samples` (stored in
        their rows): one predict call per model, over the in-domain samples only."""
        from pipeline.processing.columns import Columns

        self.start()
        domain = in_domain(features)
        rows: dict[str, np.ndarray] = {"in_domain": domain}
        # The lap a prediction is for (a straggler from an earlier lap takes the
        # current lap's features): live scores group by it.
        rows["predicted_lap"] = features["lap_number"].to_numpy(dtype=float)
        scored = distinct_runs(features.to_numpy(dtype="float32")[domain])  # columns: FEATURES
        for label in self.labels:
            self._columns(rows, label, self.served.get(label), scored, domain, "")
            shadow = self.shadow.get(label)
            champion = self.served.get(label)
            if shadow and champion and shadow.version == champion.version:
                shadow = None  # the same version twice: nothing to compare
            self._columns(rows, label, shadow, scored, domain, "_challenger")
        return Columns(rows, len(samples), frozenset({"predicted_lap"}))
