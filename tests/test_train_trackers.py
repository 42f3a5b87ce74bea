"""Experiment trackers (train.report_to): each real library, offline, reads back what the loop logged.

The numbers a tracker holds are compared with metrics.jsonl's, record by record: exactly where the library keeps a
float64 (MLflow, W&B, trackio), after rounding to float32 where it keeps that (TensorBoard's scalars). The test
setup installs every tracker (the `trackers` extra is part of `test`), so a missing library fails here.
"""
from __future__ import annotations

import glob
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from lorakit import finetune
from lorakit.cli import main
from lorakit.config import read_yaml
from lorakit.errors import ConfigError
from lorakit.optional import MissingDependency, install_hint
from lorakit.schema import to_plain
from lorakit.train import TrainConfig, distributed, read_metrics
from lorakit.train import trackers as trackers_module
from lorakit.train.trackers import STATE_FILE, Tracker, open_trackers, wandb_mode
from train_fixtures import run_tiny

ALL = ("tensorboard", "mlflow", "wandb", "trackio")
SETTINGS = dict(epochs=2, eval_examples=4, eval_every=3, log_every=2, save_every=2)  # 8 steps, 5 records


class Interrupt(Exception):
    """Stands in for a crash right after a checkpoint."""


def stop_at(step: int):
    def on_checkpoint(folder: Path) -> None:
        if folder.name == f"step-{step}":
            raise Interrupt
    return on_checkpoint


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Every tracker local: no user store, no W&B key, W&B's own files under the test's folder."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_DIR",
                 "TRACKIO_DIR", "TRACKIO_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")  # never the network, whatever the machine holds
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))


def records(run_dir: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of `key` in metrics.jsonl."""
    return [(r["step"], r[key]) for r in read_metrics(run_dir / "metrics.jsonl") if r.get(key) is not None]


# ----------------------------------------------------------------------------- the setting and its errors


def test_report_to_names_trackers_and_defaults_to_none():
    assert TrainConfig().report_to == []
    assert TrainConfig(report_to="tensorboard,wandb").report_to == ["tensorboard", "wandb"]  # the CLI's a,b form
    with pytest.raises(ConfigError) as error:
        TrainConfig(report_to=["tensorbord"])
    assert str(error.value) == ("train.report_to[0]: must be one of tensorboard, mlflow, wandb, trackio "
                                "(got 'tensorbord')")
    with pytest.raises(ConfigError) as error:
        TrainConfig(report_to=["mlflow", "mlflow"])
    assert str(error.value) == "train.report_to: names a tracker more than once (got ['mlflow', 'mlflow'])"


TITLES = {"tensorboard": "TensorBoard", "mlflow": "MLflow", "wandb": "Weights & Biases", "trackio": "trackio"}


@pytest.mark.parametrize("name", ALL)
def test_a_missing_library_is_one_line_before_anything_runs(name, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, name, None)  # as if the package were not installed
    with pytest.raises(MissingDependency) as error:
        run_tiny(tmp_path / "run", report_to=[name])
    assert str(error.value) == (f"train.report_to {name} ({TITLES[name]}) needs {name}, which is not installed; "
                                f"install the '{name}' extra: {install_hint(name)}")
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


def test_the_cli_refuses_a_missing_tracker_before_the_data_and_the_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    args = ["train", "quickstart", f"output_dir={tmp_path}", "train.report_to=[tensorboard, mlflow]"]
    assert main(args) == 2
    assert capsys.readouterr().err == ("error: train.report_to mlflow (MLflow) needs mlflow, which is not installed; "
                                       f"install the 'mlflow' extra: {install_hint('mlflow')}\n")
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------- what the loop hands the trackers


class Recording(Tracker):
    """A tracker that keeps what it is given (it stands in for a library in the plumbing tests)."""

    name, title = "tensorboard", "recording"
    opened: list["Recording"] = []

    @classmethod
    def modules(cls):
        return ()  # no library

    def __init__(self, run) -> None:
        self.run, self.logged, self.summaries, self.closed = run, [], [], []
        Recording.opened.append(self)

    def log(self, step, values):
        self.logged.append((step, values))

    def summary(self, step, values):
        self.summaries.append((step, values))

    def close(self, failed):
        self.closed.append(failed)


@pytest.fixture
def recording(monkeypatch):
    monkeypatch.setitem(trackers_module.TRACKERS, "tensorboard", Recording)
    Recording.opened = []
    return Recording.opened


def test_each_metrics_record_the_config_and_the_summary_reach_the_tracker(tmp_path, recording):
    summary, _ = run_tiny(tmp_path, report_to=["tensorboard"], **SETTINGS)
    (tracker,) = recording
    expected = [(r["step"], {k: v for k, v in r.items() if k != "step" and v is not None})
                for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert tracker.logged == expected and [step for step, _ in expected] == [2, 3, 4, 6, 8]
    cfg = TrainConfig(lr=1e-2, epochs=2, micro_batch_size=4, schedule="constant", progress="none",  # run_tiny's
                      report_to=["tensorboard"], eval_every=3, log_every=2, save_every=2)
    assert tracker.run.config == {"train": to_plain(cfg)}  # what train() records without a run config
    numbers = {f"summary/{k}": v for k, v in summary.to_dict().items() if isinstance(v, (int, float)) and v is not None}
    assert tracker.summaries == [(8, numbers)] and tracker.closed == [False]
    assert json.loads((tmp_path / STATE_FILE).read_text()) == {"tensorboard": {}}


def test_a_run_that_fails_closes_its_trackers_as_failed(tmp_path, recording):
    with pytest.raises(Interrupt):
        run_tiny(tmp_path, report_to=["tensorboard"], on_checkpoint=stop_at(4), **SETTINGS)
    (tracker,) = recording
    assert [step for step, _ in tracker.logged] == [2, 3, 4] and tracker.summaries == []
    assert tracker.closed == [True]


def test_a_run_of_lorakit_train_hands_its_whole_config_to_the_trackers(tmp_path, recording):
    run = finetune("quickstart", output_dir=str(tmp_path), log=lambda line: None,
                   **{"train.max_steps": 2, "data.limit": 8, "data.val_limit": 4, "train.report_to": "tensorboard"})
    (tracker,) = recording
    assert tracker.run.config == read_yaml(run.run_dir / "config.yaml")  # model, method, data and train sections
    assert tracker.run.name == run.run_dir.name and tracker.closed == [False]
    assert [step for step, _ in tracker.logged] == [r["step"] for r in run.metrics]


class RankOne(distributed.Parallel):
    """The single-process strategy, posing as rank 1 of a run: it must write and track nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.rank = 1


def test_only_rank_0_tracks(tmp_path, recording, monkeypatch):
    assert open_trackers(ALL, tmp_path, {}, resume_step=None, main=False).trackers == []
    assert not any(tmp_path.iterdir())  # nothing opened, nothing written
    with monkeypatch.context() as patch:
        patch.setattr(distributed, "choose", lambda *args: RankOne())
        run_tiny(tmp_path / "rank1", report_to=["tensorboard"], epochs=1)
    assert recording == [] and not (tmp_path / "rank1" / STATE_FILE).exists()
    run_tiny(tmp_path / "rank0", report_to=["tensorboard"], epochs=1)
    assert len(recording) == 1 and len(recording[0].logged) == 4


# ----------------------------------------------------------------------------- TensorBoard


def test_tensorboard_event_files_hold_the_metrics_config_and_summary(tmp_path):
    importlib.import_module("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary, _ = run_tiny(tmp_path, report_to=["tensorboard"], **SETTINGS)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    for key in ("loss", "eval_loss", "lr", "grad_norm", "tokens_per_s", "trained_tokens", "epoch"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert logged == [(step, float(np.float32(value))) for step, value in records(tmp_path, key)], key
    assert events.Scalars("summary/final_loss")[0].value == np.float32(summary.final_loss)
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert yaml.safe_load(text.removeprefix("```yaml\n").removesuffix("```"))["train"]["lr"] == 1e-2


def test_tensorboard_forgets_the_steps_a_resumed_run_replays(tmp_path):
    importlib.import_module("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with pytest.raises(Interrupt):
        run_tiny(tmp_path, report_to=["tensorboard"], on_checkpoint=stop_at(6), **SETTINGS)
    run_tiny(tmp_path, report_to=["tensorboard"], resume=tmp_path / "checkpoints" / "step-4", **SETTINGS)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert len(glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))) == 2
    logged = [(e.step, e.value) for e in events.Scalars("loss")]  # steps 6 (and 5) of the first segment dropped
    assert logged == [(step, float(np.float32(value))) for step, value in records(tmp_path, "loss")]
    assert [step for step, _ in logged] == [2, 3, 4, 6, 8]


# ----------------------------------------------------------------------------- MLflow


def mlflow_runs(run_dir: Path):
    """The MLflow client on the run folder's SQLite store, and the runs of experiment lorakit."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lorakit")
    return client, client.search_runs([experiment.experiment_id])


def test_mlflow_sqlite_store_holds_the_metrics_params_and_summary(tmp_path):
    importlib.import_module("mlflow")
    summary, _ = run_tiny(tmp_path, report_to=["mlflow"], **SETTINGS)
    client, (run,) = mlflow_runs(tmp_path)
    assert run.info.run_name == tmp_path.name and run.info.status == "FINISHED"
    for key in ("loss", "eval_loss", "lr", "grad_norm", "tokens_per_s", "trained_tokens", "epoch"):
        history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        assert history == records(tmp_path, key), key  # float64 in, float64 out
    params = run.data.params
    assert (params["train.lr"], params["train.micro_batch_size"], params["train.schedule"]) == ("0.01", "4", "constant")
    assert params["train.report_to"] == '["mlflow"]' and params["train.max_steps"] == "null"
    assert run.data.metrics["summary/final_loss"] == summary.final_loss
    assert run.data.metrics["summary/trained_tokens"] == summary.trained_tokens
    assert json.loads((tmp_path / STATE_FILE).read_text()) == {"mlflow": {"run_id": run.info.run_id}}


def test_mlflow_marks_a_failed_run_and_a_resumed_run_continues_it(tmp_path):
    importlib.import_module("mlflow")
    with pytest.raises(Interrupt):
        run_tiny(tmp_path, report_to=["mlflow"], on_checkpoint=stop_at(6), **SETTINGS)
    client, (failed,) = mlflow_runs(tmp_path)
    assert failed.info.status == "FAILED"
    run_tiny(tmp_path, report_to=["mlflow"], resume=tmp_path / "checkpoints" / "step-4", **SETTINGS)
    client, (run,) = mlflow_runs(tmp_path)  # the same run, finished
    assert run.info.run_id == failed.info.run_id and run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert steps == [2, 3, 4, 6, 6, 8]  # MLflow keeps the first attempt's step 6 beside the replayed one


def test_mlflow_follows_the_users_tracking_uri(tmp_path, monkeypatch):
    importlib.import_module("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'shared.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "my-experiment")
    run_tiny(tmp_path / "run", report_to=["mlflow"], epochs=1)
    assert not (tmp_path / "run" / "mlflow.db").exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'shared.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("my-experiment").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- W&B


def wandb_records(run_dir: Path) -> list[dict]:
    """The records of the run's offline .wandb file, as W&B's own reader (`wandb leet inspect --json`) prints them."""
    (log_file,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    done = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", log_file], capture_output=True,
                          text=True, check=True, timeout=120)
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_wandb_offline_run_holds_the_history_config_and_summary(tmp_path, request):
    wandb = importlib.import_module("wandb")
    request.addfinalizer(wandb.teardown)  # stop W&B's service process
    summary, _ = run_tiny(tmp_path, report_to=["wandb"], **SETTINGS)
    logged = wandb_records(tmp_path)
    history = [r["history"] for r in logged if r["type"] == "history"]
    assert [h["step"]["num"] for h in history] == [2, 3, 4, 6, 8]
    for key in ("loss", "eval_loss", "lr", "grad_norm", "tokens_per_s", "trained_tokens", "epoch"):
        values = [(h["step"]["num"], h["item"][key]) for h in history if key in h["item"]]
        assert values == records(tmp_path, key), key
    (run,) = [r["run"] for r in logged if r["type"] == "run"]
    assert run["display_name"] == tmp_path.name and run["project"] == "lorakit"
    assert run["config"]["update"]["train"]["lr"] == 1e-2
    assert run["config"]["update"]["train"]["report_to"] == ["wandb"]
    closing = {k: v for r in logged if r["type"] == "summary" for k, v in r["summary"]["update"].items()}
    assert closing["summary/final_loss"] == summary.final_loss and closing["summary/steps"] == 8
    assert [r["exit"]["exit_code"] for r in logged if r["type"] == "exit"] == [0]
    assert json.loads((tmp_path / STATE_FILE).read_text()) == {"wandb": {"id": run["run_id"]}}


def test_wandb_stays_offline_unless_the_user_chose_a_mode_or_logged_in(tmp_path, monkeypatch):
    wandb = importlib.import_module("wandb")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # no stored credentials either
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_mode(wandb) == "offline"  # no mode, no key: offline, no prompt
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(wandb) is None  # the user's mode, read by W&B itself
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    assert wandb_mode(wandb) is None  # logged in: W&B's own default (online)


# ----------------------------------------------------------------------------- trackio


@pytest.fixture(scope="module")
def trackio_store():
    """trackio, with its store in the test folder conftest.py names (trackio reads TRACKIO_DIR at its first import)."""
    trackio = importlib.import_module("trackio")
    from trackio import utils

    assert Path(utils.TRACKIO_DIR) == Path(os.environ["TRACKIO_DIR"])
    return trackio


def test_trackio_local_store_holds_the_metrics_config_and_summary(tmp_path, trackio_store, monkeypatch):
    from trackio.sqlite_storage import SQLiteStorage

    monkeypatch.setenv("TRACKIO_PROJECT", "lorakit-test")
    summary, _ = run_tiny(tmp_path, report_to=["trackio"], **SETTINGS)
    (run,) = trackio_store.Api().runs("lorakit-test")
    assert run.name == tmp_path.name
    assert run.config["train"]["lr"] == 1e-2 and run.config["train"]["report_to"] == ["trackio"]
    logs = SQLiteStorage.get_logs("lorakit-test", tmp_path.name)
    for key in ("loss", "eval_loss", "lr", "grad_norm", "tokens_per_s", "trained_tokens", "epoch"):
        values = [(row["step"], row[key]) for row in logs if key in row]
        assert values == records(tmp_path, key), key
    closing = [row for row in logs if "summary/final_loss" in row]
    assert [(row["step"], row["summary/final_loss"]) for row in closing] == [(8, summary.final_loss)]
