"""Continuous training: ``raylens ct check SPEC`` decides whether new data calls for a new model.

The newest data version (the spec's source as it is now, built into the feature store or found
there unchanged) is compared with the version production was trained on: a schema change, a
feature's drift (PSI or the KS statistic past the spec's ``ct`` thresholds) or the rows' growth.
The decision is a value with its reasons; the CLI runs the pipeline when it says retrain.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from raylens.cluster.experiment import Experiment
from raylens.cluster.release import production_version
from raylens.errors import UserError


@dataclass(frozen=True)
class RetrainDecision:
    retrain: bool
    reasons: list[str]
    newest: str
    """The feature-set version of the data as it is now."""
    production: str | None = None
    """The production model version, if any."""
    trained_on: str | None = None
    """The feature-set version production was trained on."""
    diff: Any = field(default=None, repr=False)
    """The ``FeatureSetDiff`` between the two versions, when both exist."""


def check_retraining(experiment: Experiment) -> RetrainDecision:
    """Build (or find) the newest data version and judge it against production's."""
    import mlflow

    from raylens.features import open_feature_set
    from raylens.features.drift import diff_feature_sets

    spec = experiment.spec
    name = spec.tracking.register_as
    if name is None:
        raise UserError("tracking.register_as: continuous training retrains a registered model; name it")
    newest = experiment.build_features()
    uri = experiment.tracking_uri
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    production = production_version(client, name)
    if production is None:
        return RetrainDecision(True, [f"'{name}' has no production version yet"], newest.version)
    tags = client.get_model_version(name, production).tags
    trained_on = tags.get("raylens.feature_set_version")
    if trained_on is None:
        return RetrainDecision(
            True,
            [f"production version {production} records no feature-set version"],
            newest.version,
            production,
        )
    if trained_on == newest.version:
        return RetrainDecision(
            False,
            [f"the data is unchanged: production version {production} was trained on {trained_on}"],
            newest.version,
            production,
            trained_on,
        )
    before = open_feature_set(
        experiment.workspace.feature_store, tags.get("raylens.feature_set", spec.name), trained_on
    )
    diff = diff_feature_sets(before, newest)
    config = spec.ct
    reasons = []
    if config.schema_change and diff.schema_changed:
        changed = diff.added + diff.removed + [column for column, _, _ in diff.retyped]
        reasons.append(f"the source's schema changed ({', '.join(changed)})")
    for drift in diff.drift:
        if drift.psi >= config.psi or drift.ks >= config.ks:
            reasons.append(
                f"'{drift.column}' drifted: PSI {drift.psi:.3f} (threshold {config.psi:g}), "
                f"KS {drift.ks:.3f} (threshold {config.ks:g})"
            )
    rows_before, rows_after = (sum(rows.values()) for rows in diff.rows)
    growth = rows_after / rows_before - 1 if rows_before else float("inf")
    if growth >= config.row_growth:
        reasons.append(
            f"the rows grew by {growth:.0%} ({rows_before} → {rows_after}; threshold {config.row_growth:.0%})"
        )
    retrain = bool(reasons)
    if not retrain:
        most = diff.drift[0] if diff.drift else None
        reasons.append(
            f"{newest.version} is within the thresholds of {trained_on}"
            + (f" (largest drift: '{most.column}', PSI {most.psi:.3f}, KS {most.ks:.3f})" if most else "")
        )
    return RetrainDecision(retrain, reasons, newest.version, production, trained_on, diff)
