from __future__ import annotations

import uuid
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from pipeline.settings import Settings


def test_run_logged_and_read_back(stack: Settings, tmp_path: Path) -> None:
    mlflow.set_tracking_uri(stack.mlflow_tracking_uri)
    experiment = f"integration-{uuid.uuid4().hex[:8]}"
    mlflow.set_experiment(experiment)
    note = tmp_path / "note.md"
    note.write_text("# served artifact\n")
    with mlflow.start_run(run_name="roundtrip") as run:
        mlflow.log_param("horizon_s", 30)
        mlflow.log_metric("pr_auc", 0.42)
        mlflow.log_artifact(str(note))

    client = MlflowClient(stack.mlflow_tracking_uri)
    stored = client.get_run(run.info.run_id)
    assert stored.data.params == {"horizon_s": "30"}
    assert stored.data.metrics == {"pr_auc": 0.42}
    assert stored.info.status == "FINISHED"
    # The artifact went through the server (mlflow-artifacts:/), not a local path.
    assert stored.info.artifact_uri.startswith("mlflow-artifacts:")
    local = client.download_artifacts(run.info.run_id, "note.md", str(tmp_path / "dl"))
    assert Path(local).read_text() == "# served artifact\n"
    client.delete_experiment(client.get_experiment_by_name(experiment).experiment_id)
