"""Runs that survive interruption, re-evaluate from checkpoints, repeat exactly, refuse bad input.

One short uninterrupted quick-start run (``reference``) is shared: the resumed run, the
repeated run and the evaluation-only runs must reproduce its results.csv exactly (CPU).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import ROOT, SHORT_RUN, compose_config, light_overrides
from omegaconf import OmegaConf
from test_run import run_cli

from mchad.errors import NonFiniteLossError
from mchad.models.module import OODModel
from mchad.runs.train import RESULT_COLUMNS, run, write_results
from mchad.task import main

METRICS = ["Accuracy", "AUROC", "AUPR-IN", "AUPR-OUT", "FPR95"]
# 3 short epochs; validation every epoch writes last.ckpt
SHORT = [*SHORT_RUN, "trainer.enable_progress_bar=false"]


def _light_overrides() -> list[str]:
    """Drop the slow view/plot callbacks and TensorBoard (whatever they are called now)."""
    return light_overrides(*SHORT)


@pytest.fixture(scope="module")
def fast() -> list[str]:
    return SHORT + _light_overrides()


def metrics_equal(a: Path, b: Path, ignore: tuple[str, ...] = ()) -> None:
    x, y = pd.read_csv(a), pd.read_csv(b)
    assert list(x.columns) == list(y.columns) == RESULT_COLUMNS
    pd.testing.assert_frame_equal(x.drop(columns=list(ignore)), y.drop(columns=list(ignore)), check_exact=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, fast) -> Path:
    """An uninterrupted short run (its folder)."""
    folder = tmp_path_factory.mktemp("reference")
    run(compose_config(fast, folder))
    return folder


class Interrupted(RuntimeError):
    pass


def test_resume_after_interruption_matches_uninterrupted_run(reference, fast, tmp_path, monkeypatch):
    """Guards exact resume: a run killed mid-epoch 2 and resumed with the documented command
    (`python run.py resume=<run folder>`) ends with the results.csv of the uninterrupted run.
    Fails without the RNG states in the checkpoint (the augmentation draws differ), without
    last.ckpt every epoch, or if resume= does not continue in the run's folder."""
    folder = tmp_path / "run"
    original = OODModel.on_train_batch_start

    def die(self, batch, batch_idx):
        if self.current_epoch == 2 and batch_idx == 1:
            raise Interrupted("simulated kill")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(OODModel, "on_train_batch_start", die)
    with pytest.raises(Interrupted):
        run(compose_config(fast, folder))
    monkeypatch.undo()
    assert (folder / "checkpoints" / "last.ckpt").is_file()
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
    assert not (folder / "results.csv").exists()

    result = run_cli(f"resume={folder}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics_equal(reference / "results.csv", folder / "results.csv")
    # the earlier epochs' metrics survive in csv/metrics.csv, without duplicated rows
    steps = pd.read_csv(folder / "csv" / "metrics.csv")["step"]
    assert steps.tolist() == pd.read_csv(reference / "csv" / "metrics.csv")["step"].tolist()


def test_same_command_twice_gives_identical_results(reference, fast, tmp_path):
    """Guards determinism: `python run.py <same overrides>` in a new process reproduces the
    reference run's results.csv exactly (seeded weights, data order, augmentation)."""
    result = run_cli(*fast, f"paths.log_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    (again,) = tmp_path.glob("runs/*/*/results.csv")
    metrics_equal(reference / "results.csv", again)


def test_eval_only_reproduces_and_tests_new_modules(reference, fast, tmp_path):
    """Guards evaluation only: `train=false ckpt_path=<run folder>` tests the run's last
    checkpoint without training (same results as the run itself), and with other test modules
    (`testmodules=noise`) writes their rows in a new run folder."""
    same = run(compose_config([*fast, "train=false", f"ckpt_path={reference}"], tmp_path / "same"))
    trained, evaluated = pd.read_csv(reference / "results.csv"), pd.read_csv(same)
    # the same rows, marked as an evaluation of the reference's checkpoint (issue 21)
    assert (evaluated.pop("evaluated_from") == str(reference / "checkpoints" / "last.ckpt")).all()
    pd.testing.assert_frame_equal(trained.drop(columns="evaluated_from"), evaluated, check_exact=True)
    assert not (tmp_path / "same" / "checkpoints").exists()  # nothing was trained
    other = run(
        compose_config(
            [*fast, "train=false", f"ckpt_path={reference}/checkpoints/last.ckpt", "testmodules=noise"],
            tmp_path / "noise",
        )
    )
    frame = pd.read_csv(other)
    assert set(frame.test_case) == {"GaussianNoise", "UniformNoise"}
    assert set(frame.Accuracy) == set(pd.read_csv(reference / "results.csv").Accuracy)  # the same ID test set


def test_eval_only_takes_the_model_of_the_run_and_refuses_a_contradicting_one(fast, tmp_path):
    """Issue 32: `train=false ckpt_path=<a CAC run>` needed `model=cac` again. Now the model
    (method, backbone, n_embedding, semantics) comes from the run's config.yaml, as resume=
    restores it; a command-line model that contradicts it is refused in one line naming both."""
    cac = tmp_path / "cac"
    trained = pd.read_csv(run(compose_config([*fast, "model=cac"], cac)))
    evaluated = pd.read_csv(run(compose_config([*fast, "train=false", f"ckpt_path={cac}"], tmp_path / "eval")))
    assert (evaluated.method == "CAC").all() and (evaluated.experiment == "digits-cac").all()
    assert (evaluated.AUROC.values == trained.AUROC.values).all()
    saved = OmegaConf.load(cac / "config.yaml").model
    assert OmegaConf.load(tmp_path / "eval" / "config.yaml").model == saved
    # agreeing choices are accepted, contradicting ones refused naming both
    run(compose_config([*fast, "model=cac", "train=false", f"ckpt_path={cac}"], tmp_path / "agree"))
    message = _error_of([*fast, "model=mchad", "train=false", f"ckpt_path={cac}"], tmp_path / "a")
    assert message.startswith(
        "error: model=mchad contradicts the model of the run being tested, model.name=CAC in "
        f"{cac / 'config.yaml'} (model.name MCHAD here, CAC there)"
    ), message
    message = _error_of([*fast, "model.n_embedding=8", "train=false", f"ckpt_path={cac}"], tmp_path / "b")
    assert (
        f"model.n_embedding=8 contradicts the model of the run being tested, model.n_embedding={saved.n_embedding}"
        in message
    )


def _error_of(overrides: list[str], output_dir: Path) -> str:
    """The one-line message `run.py` would exit with (mchad.task.main's SystemExit)."""
    cfg = compose_config(overrides, output_dir)
    with pytest.raises(SystemExit) as info:
        main(cfg)
    message = str(info.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    assert not (output_dir / "results.csv").exists()
    return message


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.backbone.n_embedding=8"], "n_embedding"),
        (["model.weight_center=-1"], "weight_center must be >= 0"),
        (["model.margin=-0.5"], "margin must be >= 0"),
        (["+trainer.max_epoch=3"], "max_epoch"),
        (["datamodule=imagefolder", "datamodule.root=/nonexistent/images"], "not found in /nonexistent/images"),
        (["train=false"], "ckpt_path"),
        (["resume=/nonexistent/run"], "not a run folder"),
    ],
    ids=[
        "n_embedding",
        "negative-weight",
        "negative-margin",
        "misspelled-added-key",
        "missing-data",
        "eval-without-ckpt",
        "resume-nowhere",
    ],
)
def test_bad_input_is_one_line_without_results(overrides, expected, fast, tmp_path):
    """Guards bad input: each mistake ends with one `error: ...` line naming the cause,
    and no results.csv."""
    assert expected in _error_of([*fast, *overrides], tmp_path / "run")


def test_corrupt_image_is_one_line(image_folder, fast, tmp_path):
    """Guards a corrupt image file: named in one line (not a PIL traceback)."""
    (image_folder / "train" / "class0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    overrides = [
        "datamodule=imagefolder",
        f"datamodule.root={image_folder}",
        "datamodule.n_classes=3",
        f"dataset_dir={tmp_path}/data",
        "testmodules=noise",
    ]
    assert "broken.png" in _error_of([*fast, *overrides], tmp_path / "run")


def test_truncated_cache_is_rebuilt(image_folder, tmp_path, caplog):
    """Guards a truncated dataset cache: one warning, then the data is decoded again."""
    from mchad.data import ImageFolderSource

    source = ImageFolderSource(str(image_folder), split="train", size=32)
    first = source.load(tmp_path)
    (cache,) = (tmp_path / "cache").glob("*.pt")
    cache.write_bytes(cache.read_bytes()[:100])
    again = source.load(tmp_path)
    assert torch.equal(first.images, again.images)
    assert any("unreadable cache" in r.getMessage() for r in caplog.records)


def test_corrupt_or_mismatched_checkpoint_is_one_line(reference, fast, tmp_path):
    """Guards checkpoints: a truncated file (ckpt_path= or resume=) and a checkpoint of another
    model each give one line; no results.csv is left."""
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes((reference / "checkpoints" / "last.ckpt").read_bytes()[:1000])
    assert "unreadable" in _error_of([*fast, "train=false", f"ckpt_path={broken}"], tmp_path / "a")
    bare = tmp_path / "bare" / "last.ckpt"  # outside a run folder: tested with the configured model
    bare.parent.mkdir()
    shutil.copy(reference / "checkpoints" / "last.ckpt", bare)
    message = _error_of([*fast, "train=false", f"ckpt_path={bare}", "model.n_embedding=8"], tmp_path / "b")
    assert "does not fit the configured model" in message
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    shutil.copy(broken, copy / "checkpoints" / "last.ckpt")
    assert "unreadable" in _error_of([*fast, f"resume={copy}"], tmp_path / "c")
    # a resumed run that cannot start leaves the run folder as it was
    shutil.copy(reference / "checkpoints" / "last.ckpt", copy / "checkpoints" / "last.ckpt")
    assert "n_embedding" in _error_of([*fast, f"resume={copy}", "model.backbone.n_embedding=8"], tmp_path / "d")
    assert (copy / "results.csv").exists()
    assert (copy / "config.yaml").read_text() == (reference / "config.yaml").read_text()


def test_resumed_csv_history_is_kept_without_lightnings_false_deletion_warning(tmp_path):
    """Issue 32: every resume warned that the csv/ logs "will be deleted"; the rows up to the
    checkpoint are kept, so the warning was false."""
    import warnings

    from pytorch_lightning.loggers import CSVLogger

    from mchad.runs.resume import keep_csv_history

    folder = tmp_path / "csv"
    folder.mkdir()
    (folder / "metrics.csv").write_text("epoch,step,train_loss\n0,4,1.5\n1,9,1.0\n2,14,0.5\n")
    (folder / "hparams.yaml").write_text("{}\n")
    logger = CSVLogger(save_dir=str(tmp_path), name="csv", version="")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keep_csv_history([logger], global_step=9)
    assert not [w for w in caught if "will be deleted" in str(w.message)]
    assert [row["step"] for row in logger.experiment.metrics] == ["4", "9"]


def test_resume_refuses_to_change_config_groups(reference, fast, tmp_path):
    """Guards resume's configuration: the run's own config.yaml is used; a group override
    (another model) is refused in one line instead of silently mixing configurations."""
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    assert "config group" in _error_of([*fast, f"resume={copy}", "model=softmax"], tmp_path / "x")


def test_nan_loss_stops_and_names_the_step(fast, tmp_path, monkeypatch):
    """Guards the NaN check: a loss that becomes NaN at step 4 stops training with one line
    naming step 4; no results.csv."""
    original = OODModel.training_step

    def poisoned(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        return loss * float("nan") if self.global_step == 4 else loss

    monkeypatch.setattr(OODModel, "training_step", poisoned)
    message = _error_of(fast, tmp_path / "run")
    assert "NaN at step 4 (epoch 1)" in message


def test_nan_check_without_host_sync_reports_first_bad_step():
    """Guards the accelerator path of the NaN check: with no per-step sync the first bad
    step is kept on the device and reported at the next check (log interval / epoch end)."""
    from types import SimpleNamespace

    from mchad.runs.nan_guard import NonFiniteLossGuard

    guard = NonFiniteLossGuard(sync_every_step=False)
    trainer = SimpleNamespace(global_step=0, current_epoch=0, log_every_n_steps=50)
    losses = [1.0, 2.0, float("nan"), float("inf"), 1.0]
    for i, value in enumerate(losses):
        trainer.global_step = i + 1
        guard.on_train_batch_end(trainer, None, {"loss": torch.tensor(value)}, None, i)  # no check yet
    with pytest.raises(NonFiniteLossError, match="at step 2"):
        guard.on_train_epoch_end(trainer, None)


def test_results_csv_is_atomic(tmp_path, monkeypatch):
    """Guards write_results: a failure while writing leaves neither a partial results.csv nor
    a temporary file; the previous complete file stays intact."""
    path = tmp_path / "results.csv"
    write_results([{"test_case": "a", "AUROC": 0.5}], path)
    before = path.read_text()

    def fail(self, target, **kwargs):
        Path(target).write_text("experiment,id_da")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", fail)
    with pytest.raises(OSError):
        write_results([{"test_case": "b"}], path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]


def test_failed_run_removes_stale_results(reference, fast, tmp_path):
    """Guards a failed run in a folder that holds an older results.csv (e.g. an eval-only
    run pointed at an existing folder): the stale file is removed, not left to be mistaken
    for this run's."""
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(reference / "results.csv", folder / "results.csv")
    overrides = [
        "train=false",
        f"ckpt_path={reference}",
        "testmodules=imagefolder",
        "datamodule.test_cases.ImageFolder.root=/nonexistent/ood",
    ]
    assert "not found" in _error_of([*fast, *overrides], folder)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("experiment=no-such-experiment", "no-such-experiment"),
        ("model=no-such-method", "no-such-method"),
        ("trainer.max_epoch=3", "max_epoch"),
    ],
)
def test_cli_config_mistakes_exit_nonzero(override, expected, tmp_path):
    """Guards Hydra-level mistakes (unknown experiment or method, misspelled key): non-zero
    exit, the cause in the first line of stderr, no results.csv."""
    result = run_cli(override, f"paths.log_dir={tmp_path}", timeout=120)
    assert result.returncode != 0
    first = result.stderr.strip().splitlines()[0]
    assert expected in first, result.stderr
    assert not list(tmp_path.rglob("results.csv"))


def test_cli_user_error_is_last_stderr_line(failed_run):
    """Guards run.py's handling of a user error: exit status 1, no traceback, the cause as
    the last line of stderr."""
    assert failed_run.returncode == 1
    assert "Traceback" not in failed_run.stderr
    assert failed_run.console().strip().splitlines()[-1] == "error: model.method: margin must be >= 0, got -1"
    assert not list(failed_run.logs.rglob("results.csv"))


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    """Guards last.ckpt against a kill while saving: the checkpoint is written to a temporary
    file and renamed, so a failed write keeps the previous checkpoint and leaves no debris."""
    import lightning_fabric.plugins.io.torch_io as torch_io

    from mchad.checkpoints import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, path)

    def killed(checkpoint, target):
        Path(target).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch_io, "_atomic_save", killed)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(2)}}, path)
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


# ----------------------------------------------------------------------------- untrusted checkpoints


class PlantedPayload:
    """Unpickling this runs code: it creates ``marker`` (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _planted(reference: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the reference run's last.ckpt with a pickle payload planted in it."""
    marker = tmp_path / "payload-ran"
    ckpt = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["extra"] = PlantedPayload(marker)
    path = tmp_path / "shared.ckpt"
    torch.save(ckpt, path)
    return path, marker


def test_project_checkpoints_load_weights_only(reference):
    """Guards what the project writes: every checkpoint of a run (weights, optimiser, loops,
    callbacks, RNG states) loads with torch.load(weights_only=True)."""
    for path in (reference / "checkpoints").glob("*.ckpt"):
        ckpt = torch.load(path, weights_only=True)
        assert {"state_dict", "optimizer_states", "loops", "callbacks"} <= set(ckpt), path
        assert "RNGState" in ckpt["callbacks"]


def test_checkpoint_with_planted_payload_is_refused_and_never_runs(reference, fast, tmp_path):
    """Guards loading a shared checkpoint: a file that needs arbitrary unpickling is refused in
    one line (naming what it references and the opt-in) as ckpt_path (testing or training),
    resume and pretrained weights, and its payload never runs."""
    evil, marker = _planted(reference, tmp_path)
    messages = [
        _error_of([*fast, "train=false", f"ckpt_path={evil}"], tmp_path / "a"),
        _error_of([*fast, f"ckpt_path={evil}"], tmp_path / "b"),
        _error_of([*fast, f"++model.pretrained_checkpoint={evil}"], tmp_path / "c"),
    ]
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    shutil.copy(evil, copy / "checkpoints" / "last.ckpt")
    messages.append(_error_of([*fast, f"resume={copy}"], tmp_path / "d"))
    for message in messages:
        assert "was refused: loading it needs arbitrary unpickling" in message, message
        assert "pathlib.PosixPath" in message and "trust_checkpoint=true" in message, message
    assert not marker.exists()


def test_trusted_checkpoint_loads_with_the_opt_in(reference, fast, tmp_path):
    """Guards the opt-in: with trust_checkpoint=true the same file is unpickled fully (its
    payload runs, as the user accepted) and the model tests as the reference run did."""
    evil, marker = _planted(reference, tmp_path)
    results = run(
        compose_config([*fast, "train=false", f"ckpt_path={evil}", "trust_checkpoint=true"], tmp_path / "run")
    )
    assert marker.exists()
    # the planted copy lies outside a run folder: its seed is unknown (empty), evaluated_from names it
    metrics_equal(reference / "results.csv", results, ignore=("seed", "evaluated_from"))
    assert pd.read_csv(results).seed.isna().all()


# ----------------------------------------------------------------------------- preemption


@pytest.fixture
def signal_handlers():
    """The process's SIGTERM/SIGUSR1 handlers restored after the test (mchad.task installs its own)."""
    import signal

    from mchad.runs import preemption

    previous = {s: signal.getsignal(s) for s in preemption.SIGNALS}
    yield
    preemption.restore(previous)
    preemption.reset()


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1"])
def test_a_preemption_signal_stops_at_a_batch_and_says_preempted(
    name, reference, fast, tmp_path, monkeypatch, capsys, signal_handlers
):
    """SIGTERM (or SLURM's --signal SIGUSR1) in epoch 3 of 3: exit status 143, FAILED.txt says
    preempted and how to resume; the trial continuation the sweeper uses (MCHAD_CONTINUE, same
    config) and resume= both end with the uninterrupted run's results.csv."""
    import signal

    from mchad.runs import preemption
    from mchad.sweeps.sweep import CONTINUE_ENV, run_trial

    folder = tmp_path / "run"
    original = OODModel.on_train_batch_start

    def preempt(self, batch, batch_idx):
        if self.current_epoch == 2 and batch_idx == 1:
            os.kill(os.getpid(), getattr(signal, name))
        return original(self, batch, batch_idx)

    monkeypatch.setattr(OODModel, "on_train_batch_start", preempt)
    with pytest.raises(SystemExit) as info:
        main(compose_config(fast, folder))
    assert info.value.code == preemption.EXIT_PREEMPTED == 143
    hint = f"preempted by {name}; continue this run with: python run.py resume={folder}"
    assert capsys.readouterr().err.strip().splitlines()[-1] == hint
    assert (folder / "FAILED.txt").read_text().splitlines()[0] == f"error: {hint}"
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
    assert not (folder / "results.csv").exists()
    monkeypatch.undo()
    preemption.reset()
    if name == "SIGUSR1":  # the sweep's continuation of a trial
        monkeypatch.setenv(CONTINUE_ENV, str(folder / "checkpoints" / "last.ckpt"))
        assert run_trial(compose_config(fast, folder), folder)["status"] == "ok"
    else:
        main(compose_config([f"resume={folder}"], folder))
    metrics_equal(reference / "results.csv", folder / "results.csv")
    assert not (folder / "FAILED.txt").exists()


def test_a_sweep_trial_preempted_is_recorded_so_and_the_next_trials_do_not_start(fast, tmp_path, signal_handlers):
    from mchad.runs import preemption
    from mchad.sweeps.sweep import run_trial

    preemption.install()
    os.kill(os.getpid(), __import__("signal").SIGTERM)  # between two trials: no trainer runs
    summary = run_trial(compose_config(fast, tmp_path / "next"), tmp_path / "next")
    assert summary["status"] == "preempted"
    assert (tmp_path / "next" / "FAILED.txt").read_text().startswith("error: preempted by SIGTERM; continue it")
    assert not (tmp_path / "next" / "checkpoints").exists()


def test_on_slurm_lightnings_auto_requeue_is_off(fast, tmp_path, monkeypatch):
    """Ours or Lightning's requeue, never both (mchad.runs.preemption.cluster_plugins)."""
    from lightning_fabric.plugins.environments import SLURMEnvironment

    from mchad.runs.train import make_trainer

    for key, value in {
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NAME": "train",
        "SLURM_JOB_ID": "7",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "node1",
    }.items():
        monkeypatch.setenv(key, value)
    trainer = make_trainer(compose_config(fast, tmp_path), loggers=[])
    environment = trainer._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue is False


@pytest.mark.slow  # three runs of run.py (about a minute on 2 cores)
def test_sigterm_to_a_run_exits_143_soon_and_resume_gives_the_uninterrupted_result(fast, tmp_path):
    """SIGTERM mid-epoch 2 of 3 to `python run.py`: it exits with 143 within seconds, FAILED.txt
    says preempted and names the resume command, which then ends with the results.csv of the
    same run never interrupted."""
    import time

    tests = str(ROOT / "tests")
    signal_callback = [
        "+callbacks.signal._target_=sigkill_callback.SignalAt",
        "allowed_targets=[sigkill_callback.*]",
        "+callbacks.signal.seed=${seed}",
        f"+callbacks.signal.stamp={tmp_path / 'sent'}",
    ]
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]),
    }

    def cli(*overrides: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(ROOT / "run.py"), *overrides],
            cwd=ROOT,
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=300,
        )

    whole = cli(*fast, *signal_callback, f"hydra.run.dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr[-3000:]
    folder = tmp_path / "run"
    stopped = cli(*fast, *signal_callback, f"hydra.run.dir={folder}", MCHAD_TEST_SIGNAL="SIGTERM:epoch=1:batch=1")
    ended = time.time()
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    seconds = ended - float((tmp_path / "sent").read_text())
    print(f"SIGTERM to exit: {seconds:.2f} s")
    assert seconds < 30
    hint = f"preempted by SIGTERM; continue this run with: python run.py resume={folder}"
    assert stopped.stderr.strip().splitlines()[-1] == hint
    assert (folder / "FAILED.txt").read_text().splitlines()[0] == f"error: {hint}"
    resumed = cli(f"resume={folder}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics_equal(tmp_path / "whole" / "results.csv", folder / "results.csv")
