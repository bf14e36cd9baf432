"""The experiment: one spec driven through the whole phase.

    check → prepare → features → (tune) → train → evaluate → register

``Experiment.from_yaml(path).run()`` is what ``raylens run`` calls; notebooks and tests call it
too. This module is light to import (a spec and its places; validation imports only what it
checks): running the stages, which needs Ray and MLflow, is ``raylens.cluster.invocation``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from raylens.cluster.checks import CheckReport, check_experiment
from raylens.cluster.spec import (
    ExperimentSpec,
    apply_overrides,
    parse_spec,
    read_spec,
    spec_source,
    with_values,
)
from raylens.cluster.workspace import Workspace

if TYPE_CHECKING:
    from raylens.features import FeatureSet, PlannedFeatureSet, RowsDone
    from raylens.trainer.run import TrainRunResult
    from raylens.tuning import ConcurrencyPlan
    from raylens.tuning.leaderboard import Leaderboard


class Progress(Protocol):
    """What a front end (the CLI's progress bars) hears about a run."""

    def stage(self, title: str) -> None: ...
    def notice(self, text: str) -> None: ...
    def data_rows(self, what: str, done: int, total: int | None) -> None: ...
    def data_finished(self) -> None: ...
    def feature_set(self, feature_set: FeatureSet) -> None: ...
    def sweep_started(self, trials: int) -> None: ...
    def trial(self, event: Any) -> None: ...
    def sweep_finished(self) -> None: ...
    def training_started(self, epochs: int, workers: int, parallel: str = "") -> None: ...
    def epoch(self, metrics: dict[str, float]) -> None: ...
    def training_finished(self) -> None: ...


class NullProgress:
    def stage(self, title: str) -> None: ...
    def notice(self, text: str) -> None: ...
    def data_rows(self, what: str, done: int, total: int | None) -> None: ...
    def data_finished(self) -> None: ...
    def feature_set(self, feature_set: FeatureSet) -> None: ...
    def sweep_started(self, trials: int) -> None: ...
    def trial(self, event: Any) -> None: ...
    def sweep_finished(self) -> None: ...
    def training_started(self, epochs: int, workers: int, parallel: str = "") -> None: ...
    def epoch(self, metrics: dict[str, float]) -> None: ...
    def training_finished(self) -> None: ...


@dataclass(frozen=True)
class RunSummary:
    name: str
    run_name: str
    feature_set: FeatureSet
    tracking_uri: str
    root_run_id: str
    final: TrainRunResult | None = None
    best_config: dict[str, Any] = field(default_factory=dict)
    best_metrics: dict[str, float] = field(default_factory=dict)
    trials: int = 0
    concurrency: ConcurrencyPlan | None = None
    leaderboard: Leaderboard | None = None
    """The sweep's, when it ran in this invocation (``raylens leaderboard RUN_ID`` shows it later)."""
    best_spec: Path | str | None = None
    """The sweep's best configuration as a spec for ``raylens train`` (``best.yaml``): a path, or
    on object storage its URI (``--best-from`` with the sweep's run id takes it from there)."""


def command_name(tune: bool, train: bool) -> str:
    """The CLI command a combination of stages is: a resume must continue the same one."""
    return "tune" if not train else ("run" if tune else "train")


@dataclass(frozen=True)
class Experiment:
    spec: ExperimentSpec
    raw: dict[str, Any]
    """The spec as given (overrides applied), as logged with the run."""
    base_dir: Path
    """Relative data paths and user model factories are found from here (the spec's folder)."""
    workspace: Workspace

    @classmethod
    def from_yaml(
        cls,
        path: str | Path,
        runs_dir: str | Path | None = None,
        overrides: Sequence[str] = (),
        best_from: str | None = None,
    ) -> Experiment:
        """A spec file, with ``overrides`` (``"train.epochs=5"``, as ``--set`` takes them) applied.
        ``best_from``: the MLflow id of a sweep's run, whose best configuration is written in
        first (``overrides`` still win)."""
        path = Path(path)
        source = spec_source(path, overrides)
        raw = read_spec(path)
        experiment = cls(
            parse_spec(apply_overrides(raw, overrides), source),
            raw,
            path.resolve().parent,
            Workspace.at(runs_dir),
        )
        if best_from is not None:
            from raylens.cluster.invocation import best_config_of

            raw = with_values(raw, best_config_of(experiment.tracking_uri, best_from))
            source += f" --best-from {best_from}"
        raw = apply_overrides(raw, overrides)
        return replace(experiment, spec=parse_spec(raw, source), raw=raw)

    @classmethod
    def from_dict(
        cls, raw: Mapping[str, Any], *, base_dir: str | Path | None = None, runs_dir: str | Path | None = None
    ) -> Experiment:
        """A spec given as a mapping (what the YAML file would hold); relative paths in it are
        read from ``base_dir`` (default: the working folder)."""
        spec = parse_spec(raw)
        return cls(spec, dict(raw), Path(base_dir or Path.cwd()).resolve(), Workspace.at(runs_dir))

    @property
    def code_dirs(self) -> list[Path]:
        """Where user model factories are imported from: the spec's folder and the working one."""
        return [self.base_dir, Path.cwd()]

    @property
    def tracking_uri(self) -> str:
        return self.workspace.tracking_uri(self.spec.tracking.uri)

    def plan_features(self, rows_done: RowsDone | None = None) -> PlannedFeatureSet:
        """The data prepare and feature pipelines, checked and computed, nothing written."""
        from raylens.features import plan_feature_set

        return plan_feature_set(
            self.spec.name,
            self.spec.data,
            self.spec.features,
            self.base_dir,
            self.workspace.feature_store,
            rows_done=rows_done,
        )

    def build_features(self, rows_done: RowsDone | None = None) -> FeatureSet:
        """Run the data prepare and feature pipelines; the version is reused when unchanged."""
        from raylens.features import publish_feature_set

        return publish_feature_set(self.plan_features(rows_done), self.workspace.feature_store)

    def validate(
        self, *, tune: bool = True, address: str | None = None, rows_done: RowsDone | None = None
    ) -> CheckReport:
        """Every check of ``run`` that needs no Ray, all problems at once; nothing is written."""
        uri = self.tracking_uri
        return check_experiment(
            self.spec,
            self.base_dir,
            tune=tune,
            code_dirs=self.code_dirs,
            address=address,
            tracking_uri=None if uri == self.workspace.default_tracking_uri else uri,
            runs_dir_given=self.workspace.given,
            storage=self.workspace.root,
            feature_store=self.workspace.feature_store,
            rows_done=rows_done,
        )

    def run(
        self,
        *,
        tune: bool = True,
        train: bool = True,
        resume: bool = False,
        verbose: bool = False,
        address: str | None = None,
        progress: Progress | None = None,
        parent_run_id: str | Callable[[], str] | None = None,
    ) -> RunSummary:
        """The whole phase. ``tune=False`` trains the spec as written; ``train=False`` stops after
        the sweep. ``resume`` continues the latest run of this spec where it stopped.
        ``parent_run_id``: an MLflow run (of the same experiment) to nest the run under, or what
        starts one, called once every check has passed (so bad input writes nothing).

        Raises ``UserError`` (nothing written) for a mistake in the input, and ``Interrupted`` /
        ``KeyboardInterrupt`` after marking the run's MLflow runs KILLED when stopped."""
        from raylens.cluster.invocation import Invocation
        from raylens.trainer import importable_from

        with importable_from(self.code_dirs):
            return Invocation(
                self, command_name(tune, train), resume, progress or NullProgress(), parent_run_id
            ).run(verbose=verbose, address=address)

    def spec_dump(self) -> dict[str, Any]:
        return self.spec.model_dump(mode="json")
