"""Experiment trackers (`train.report_to`): TensorBoard, MLflow, W&B and trackio, fed what metrics.jsonl holds.

The loop hands each record it writes to metrics.jsonl to `Trackers.log` as well; each tracker gets the run's
config when it opens and the run's summary (summary.json's numbers, as `summary/<field>`) when it ends. One small
adapter class per library; each library is an optional extra of the same name (`pip install 'lorakit[mlflow]'`;
`lorakit[trackers]` installs all four), and a missing one is one `MissingDependency` line when the run starts
(`require_trackers`), never an error mid-run.

Local and offline unless the user's own environment says otherwise; each tracker run is named after the run folder:

    tensorboard  event files in RUN_DIR/tensorboard          (tensorboard --logdir RUN_DIR/tensorboard)
    mlflow       the SQLite store RUN_DIR/mlflow.db, artifacts in RUN_DIR/mlartifacts, or MLFLOW_TRACKING_URI when
                 set; experiment MLFLOW_EXPERIMENT_NAME, else "lorakit"
                                                            (mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow.db)
    wandb        offline files in RUN_DIR/wandb, unless WANDB_MODE is set or W&B has an API key (`wandb login`,
                 WANDB_API_KEY); project WANDB_PROJECT, else "lorakit"       (wandb sync RUN_DIR/wandb/offline-run-*)
    trackio      its own local SQLite store, TRACKIO_DIR (default ~/.cache/huggingface/trackio; trackio reads it once,
                 when first imported, so it cannot follow each run folder); project TRACKIO_PROJECT, else "lorakit"
                                                            (trackio show --project lorakit)

Only rank 0 tracks (`open_trackers(..., main=False)` opens nothing). A resumed run continues the same tracker run
(the ids are kept in RUN_DIR/trackers.json): TensorBoard drops what the first segment logged after the checkpoint
the run resumed from, as metrics.jsonl does; MLflow and trackio keep those points beside the new ones; W&B refuses
steps it has seen.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping

import yaml

from lorakit.optional import require

STATE_FILE = "trackers.json"  # run_dir/trackers.json: each tracker's ids, so a resumed run continues its tracker run
PROJECT = "lorakit"  # the default project (W&B, trackio) and experiment (MLflow) name
SUMMARY_PREFIX = "summary/"


@dataclass
class TrackedRun:
    """What a tracker is told about the run it follows."""

    run_dir: Path
    config: dict[str, Any]  # the run's whole config, as config.yaml holds it
    resume_step: int | None = None  # the step a resumed run continues from; None: a fresh run
    saved: dict[str, Any] = field(default_factory=dict)  # what this tracker kept last time (`Tracker.state`)

    @property
    def name(self) -> str:
        """The tracker run's name: the run folder's."""
        return self.run_dir.name


class Tracker:
    """One experiment tracker: the config when it opens, numbers per step, the summary and the close."""

    name: ClassVar[str]  # its train.report_to spelling, which is also its extra's name
    title: ClassVar[str]  # how messages name it

    @classmethod
    def modules(cls) -> tuple[str, ...]:
        """What it imports here (the first is the library the extra installs)."""
        return (cls.name,)

    @classmethod
    def require(cls) -> None:
        """Raise MissingDependency (one line naming the extra) unless this tracker's library imports."""
        for module in cls.modules():
            require(module, cls.name, f"train.report_to {cls.name} ({cls.title})")

    def state(self) -> dict[str, Any]:
        """What a resumed run needs to continue this tracker run (ids); kept in run_dir/trackers.json."""
        return {}

    def log(self, step: int, values: dict[str, float]) -> None:
        """One metrics record's numbers, at optimizer step `step`."""
        raise NotImplementedError

    def summary(self, step: int, values: dict[str, float]) -> None:
        """The run's closing numbers (as `summary/<field>`), logged at its last step unless the library has a place
        of its own for them."""
        self.log(step, values)

    def close(self, failed: bool) -> None:
        """End the tracker run (marked failed where the library keeps a status) and flush what it holds."""
        raise NotImplementedError


class TensorBoard(Tracker):
    """Event files (torch's SummaryWriter), scalars under the metrics.jsonl names, the config as a text entry."""

    name, title = "tensorboard", "TensorBoard"

    def __init__(self, run: TrackedRun) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # events of the steps after `purge_step - 1` that an earlier segment of this folder wrote are dropped by
        # TensorBoard's readers: a resumed run's curves equal its metrics.jsonl, a fresh start forgets a failed one
        self.writer = SummaryWriter(log_dir=str(run.run_dir / "tensorboard"), purge_step=(run.resume_step or 0) + 1)
        self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(run.config, sort_keys=False) + "```",
                             global_step=run.resume_step or 0)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # a killed run keeps what it logged, as metrics.jsonl does

    def close(self, failed: bool) -> None:
        self.writer.close()


class MLflow(Tracker):
    """An MLflow run: the config as params (dotted keys), metrics with their step, the status at the end."""

    name, title = "mlflow", "MLflow"
    PARAMS_PER_CALL = 100  # MLflow's limit on params in one log_batch
    PARAM_LENGTH = 6000  # MLflow's limit on a param's value (a long template or reward list is cut there)

    @classmethod
    def modules(cls) -> tuple[str, ...]:
        """mlflow (mlflow-skinny suffices), and for the SQLite store in the run folder sqlalchemy and alembic."""
        return ("mlflow",) if os.environ.get("MLFLOW_TRACKING_URI") else ("mlflow", "sqlalchemy", "alembic")

    def __init__(self, run: TrackedRun) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        local = not os.environ.get("MLFLOW_TRACKING_URI")
        uri = f"sqlite:///{(run.run_dir / 'mlflow.db').resolve()}" if local else os.environ["MLFLOW_TRACKING_URI"]
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment is not None else self.client.create_experiment(
            name, artifact_location=(run.run_dir / "mlartifacts").resolve().as_uri() if local else None)
        self.run_id = self._continued(run) or self.client.create_run(
            experiment_id, run_name=run.name, tags={"lorakit.run_dir": str(run.run_dir.resolve())}).info.run_id
        logged = self.client.get_run(self.run_id).data.params  # a resumed run keeps the params it started with
        params = [Param(key, value[: self.PARAM_LENGTH]) for key, value in flat_params(run.config).items()
                  if key not in logged]
        for start in range(0, len(params), self.PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=params[start: start + self.PARAMS_PER_CALL])

    def _continued(self, run: TrackedRun) -> str | None:
        """The MLflow run a resumed run continues, if its store still holds it."""
        run_id = run.saved.get("run_id") if run.resume_step is not None else None
        if run_id is None:
            return None
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException:
            return None
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def state(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step) for key, value in values.items()])

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class WandB(Tracker):
    """A W&B run: config, history per step, the summary in W&B's run summary; offline unless the user says so."""

    name, title = "wandb", "Weights & Biases"

    def __init__(self, run: TrackedRun) -> None:
        import wandb

        resumed = run.resume_step is not None and "id" in run.saved
        self.run = wandb.init(
            dir=str(run.run_dir), project=os.environ.get("WANDB_PROJECT") or PROJECT, name=run.name,
            config=run.config, id=run.saved["id"] if resumed else None, resume="allow" if resumed else None,
            mode=wandb_mode(wandb))

    def state(self) -> dict[str, Any]:
        return {"id": self.run.id}

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def summary(self, step: int, values: dict[str, float]) -> None:
        self.run.summary.update(values)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def wandb_mode(wandb: Any) -> str | None:
    """None (W&B decides) when the user chose a mode (WANDB_MODE) or has credentials (`wandb login`, WANDB_API_KEY;
    read locally, not checked online); otherwise "offline": never a login prompt, never the network unasked."""
    if os.environ.get("WANDB_MODE") or wandb.login(prompt=False, verify=False):
        return None
    return "offline"


class Trackio(Tracker):
    """A trackio run in trackio's local store (TRACKIO_DIR, default ~/.cache/huggingface/trackio: trackio fixes it when
    it is first imported, so it cannot follow each run folder of a process), project TRACKIO_PROJECT or lorakit."""

    name, title = "trackio", "trackio"

    def __init__(self, run: TrackedRun) -> None:
        import trackio

        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT") or PROJECT, name=run.name,
                                config=run.config, resume="allow" if run.resume_step is not None else "never",
                                embed=False)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish()


TRACKERS: dict[str, type[Tracker]] = {tracker.name: tracker for tracker in (TensorBoard, MLflow, WandB, Trackio)}


def require_trackers(names: Iterable[str]) -> None:
    """Import each named tracker's library now, or raise its one-line MissingDependency: a run checks this before it
    reads data or loads a model, so a missing extra never costs a run."""
    for name in names:
        TRACKERS[name].require()


class Trackers:
    """The trackers of one run: `log` each metrics record, `finish` with the summary; `close` ends any still open
    (a run that failed)."""

    def __init__(self, trackers: list[Tracker] | None = None) -> None:
        self.trackers = trackers or []
        self.last_step = 0

    def log(self, record: Mapping[str, Any]) -> None:
        """One metrics.jsonl record: its numbers (None and text left out) at its step."""
        if not self.trackers:
            return
        self.last_step = int(record["step"])
        values = numbers(record, skip=("step",))
        for tracker in self.trackers:
            tracker.log(self.last_step, values)

    def finish(self, summary: Mapping[str, Any]) -> None:
        """The run's summary (summary.json's numbers, as summary/<field>), then close every tracker as finished."""
        values = {SUMMARY_PREFIX + key: value for key, value in numbers(summary).items()}
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.summary(self.last_step, values)
            tracker.close(failed=False)

    def close(self) -> None:
        """Close the trackers still open, marking their runs failed (nothing is left open after `finish`)."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close(failed=True)


def open_trackers(names: Iterable[str], run_dir: Path, config: Mapping[str, Any], *, resume_step: int | None,
                  main: bool) -> Trackers:
    """Open the trackers `names` for the run in `run_dir` (rank 0 only: on other ranks, and with no names, none).

    `config` is the run's config as config.yaml holds it; `resume_step` the step a resumed run continues from."""
    names = list(names)
    if not main or not names:
        return Trackers()
    state_path = run_dir / STATE_FILE
    saved = json.loads(state_path.read_text()) if resume_step is not None and state_path.is_file() else {}
    opened = Trackers()
    try:
        for name in names:
            run = TrackedRun(run_dir, dict(config), resume_step, saved.get(name, {}))
            opened.trackers.append(TRACKERS[name](run))
    except BaseException:
        opened.close()
        raise
    state_path.write_text(json.dumps({**saved, **{t.name: t.state() for t in opened.trackers}}, indent=2) + "\n")
    return opened


def numbers(record: Mapping[str, Any], skip: tuple[str, ...] = ()) -> dict[str, float]:
    """The numeric entries of a record (bools, None and text left out)."""
    return {key: value for key, value in record.items()
            if key not in skip and isinstance(value, (int, float)) and not isinstance(value, bool)}


def flat_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as dotted keys with text values (`train.lr` -> '0.0002'), as MLflow keeps params."""
    out: dict[str, str] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flat_params(value, dotted + "."))
        else:
            out[dotted] = value if isinstance(value, str) else json.dumps(value)
    return out
