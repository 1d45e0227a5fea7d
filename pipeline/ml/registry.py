"""Scratch models: registered models and experiments of their own (for tests and
benchmarks that train or move aliases beside a running demo), deleted afterwards.

Mirrors `pipeline.kafka.topics.scratch_topics`: the settings it yields name every
model `<prefix>-<8 hex>-pit-stop` etc., so nothing it does can register a version
of, or move an alias of, the demo's `f1-*` models.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from pipeline.settings import Settings

log = logging.getLogger(__name__)


@contextmanager
def scratch_models(
    settings: Settings, prefix: str = "test", **updates: object
) -> Iterator[Settings]:
    """Settings with a model name prefix of their own (`<prefix>-<8 hex>`); every
    registered model (all versions) and experiment under it is deleted afterwards,
    whether the body passed or failed."""
    scratch = settings.model_copy(
        update={"model_name_prefix": f"{prefix}-{uuid.uuid4().hex[:8]}", **updates}
    )
    if scratch.model_name_prefix == settings.model_name_prefix:  # an update asked for it
        raise ValueError(f"scratch models must not use the prefix {settings.model_name_prefix!r}")
    try:
        yield scratch
    finally:
        delete_models(scratch)


def delete_models(settings: Settings) -> tuple[list[str], list[str]]:
    """Delete every registered model and experiment named `<model_name_prefix>-*`,
    with the experiments' artifacts. Returns (models, experiments) deleted."""
    import mlflow
    from mlflow.entities import ViewType
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    start = f"{settings.model_name_prefix}-"
    # LIKE patterns: the prefix is [a-z0-9-] only (see Settings), so no wildcards in it.
    pattern = f"name LIKE '{start}%'"
    client = mlflow.MlflowClient(settings.mlflow_tracking_uri)
    models = [
        m.name
        for m in _all(lambda token: client.search_registered_models(pattern, page_token=token))
        if m.name.startswith(start)
    ]
    for name in models:
        client.delete_registered_model(name)  # and every version of it
    experiments = [
        e
        for e in _all(
            lambda token: client.search_experiments(
                ViewType.ALL, filter_string=pattern, page_token=token
            )
        )
        if e.name.startswith(start)
    ]
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)  # artifacts go through the server
    for experiment in experiments:
        try:  # runs' and logged models' files: the server keeps them for deleted experiments
            files = get_artifact_repository(experiment.artifact_location)
            files.delete_artifacts()  # type: ignore[no-untyped-call]
        except Exception as err:  # the registry entries are gone; leftover files are no harm
            log.warning("artifacts of experiment %s not deleted: %s", experiment.name, err)
        if experiment.lifecycle_stage == "active":
            client.delete_experiment(experiment.experiment_id)
    log.info("deleted scratch models %s and experiments %s", models, [e.name for e in experiments])
    return models, [e.name for e in experiments]


def _all(page: Callable[[str | None], Any]) -> list[Any]:
    """Every item of a paged MLflow search (`page(token)` returns a PagedList)."""
    items: list[Any] = []
    token = None
    while True:
        batch = page(token)
        items.extend(batch)
        token = batch.token
        if not token:
            return items
