"""The MLflow tracker on a real SQLite store: nothing secret reaches the store."""

from pathlib import Path

import mlflow

from raylens.trainer.tracking import MlflowTracker

SECRETS = ("hunter2", "abc123")
SPEC_URIS = {
    "data.source": "postgresql://me:hunter2@db.internal:5432/sales",
    "tracking.uri": "https://mlflow.internal/?token=abc123",
}


def test_credentials_are_redacted_in_params_tags_and_logged_files(tmp_path: Path) -> None:
    tracker = MlflowTracker(f"sqlite:///{tmp_path}/mlflow.db", "secrets", tmp_path / "artifacts")
    run_id = tracker.start_run("run", tags={"source": SPEC_URIS["data.source"]})
    tracker.log_params(run_id, SPEC_URIS)
    tracker.set_tags(run_id, {"raylens.error": f"cannot reach {SPEC_URIS['tracking.uri']}"})
    tracker.log_dict(run_id, {"spec": SPEC_URIS, "list": [SPEC_URIS["data.source"]]}, "spec.json")
    tracker.log_text(run_id, f"data from {SPEC_URIS['data.source']}\n", "notes/error.txt")
    tracker.end_run(run_id)

    run = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id)
    recorded = [*run.data.params.values(), *run.data.tags.values()]
    recorded += [p.read_text() for p in (tmp_path / "artifacts").rglob("*") if p.is_file()]
    assert len(recorded) > 4 and any("me:***@db.internal" in text for text in recorded)
    assert run.data.params["tracking.uri"] == "https://mlflow.internal/?token=***"
    for text in recorded:
        for secret in SECRETS:
            assert secret not in text, text
    # Nor anywhere else in the store's database file.
    assert not any(secret.encode() in (tmp_path / "mlflow.db").read_bytes() for secret in SECRETS)
