"""Wrong input never ends in a plausible-looking result, and every message is one line
(issue 21): each input mistake is refused with one ``error:`` line before any result is
written; what an image folder loses or how it is converted is said in one warning naming
the folder; failed and interrupted runs say why and how to go on; the console stays quiet
when nobody watches it."""

from __future__ import annotations

import csv
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, compose_config, console_lines, imported_modules, make_image_folder
from PIL import Image
from test_robustness import SHORT, _error_of, _light_overrides, run_cli

from mchad.runs.train import RESULT_COLUMNS, run
from mchad.task import main


@pytest.fixture(scope="module")
def fast() -> list[str]:
    return SHORT + _light_overrides()


def _one_line_cli_error(*overrides: str, cwd: Path = ROOT) -> str:
    """The whole stderr of `python run.py <overrides>`: exactly one `error:` line, exit 1."""
    result = run_cli(*overrides, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    return lines[0]


def _image_overrides(root: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "datamodule=imagefolder",
        f"datamodule.root={root}",
        "datamodule.n_classes=3",
        f"dataset_dir={tmp_path / 'data'}",
        "testmodules=noise",
        *extra,
    ]


# --------------------------------------------------------------------- refused before any work


def test_n_embedding_zero_is_refused(fast, tmp_path):
    """Today's run trained a 0-dimensional embedding and wrote AUROC 0.5 everywhere."""
    assert "model.n_embedding must be >= 1, got 0" in _error_of([*fast, "model.n_embedding=0"], tmp_path / "run")


def test_cac_needs_one_embedding_dimension_per_class(fast, tmp_path):
    message = _error_of([*fast, "model=cac", "model.n_embedding=4"], tmp_path / "run")
    assert "needs model.n_embedding = datamodule.n_classes = 6, got 4" in message


def test_seed_must_be_an_integer(fast, tmp_path):
    """Today: ValueError: invalid literal for int() with a 14-line traceback."""
    assert _error_of([*fast, "seed=abc"], tmp_path / "run") == "error: seed must be an integer, got 'abc'"


def test_empty_training_class_folder_is_refused(fast, tmp_path):
    """A class folder without images: today the model trained on two of three classes."""
    root = make_image_folder(tmp_path / "images", classes=3, per_class=8)
    for file in (root / "train" / "class2").iterdir():
        file.unlink()
    message = _error_of([*fast, *_image_overrides(root, tmp_path, "datamodule.batch_size=4")], tmp_path / "run")
    assert "the training set has no images of class(es) class2" in message


def test_training_set_smaller_than_one_batch_is_refused(fast, tmp_path):
    """14 training images and batch size 128: today zero training steps and Accuracy 0.0."""
    root = make_image_folder(tmp_path / "images", classes=2, per_class=7)
    message = _error_of([*fast, *_image_overrides(root, tmp_path, "datamodule.n_classes=2")], tmp_path / "run")
    assert "do not fill one batch of datamodule.batch_size=128" in message and "13 training images" in message


def test_a_training_set_that_cannot_train_is_refused_before_any_ood_set_is_decoded(fast, tmp_path, monkeypatch):
    """The ID data are checked first: no OOD set is loaded for a run that is refused (before,
    the quick-start's two noise sets of 10,000 images were drawn and cached first)."""
    from mchad.data.sources import NoiseSource

    def refuse(self, dataset_dir=None):
        raise AssertionError(f"{self.name} was decoded")

    monkeypatch.setattr(NoiseSource, "load", refuse)
    root = make_image_folder(tmp_path / "images", classes=2, per_class=7)
    message = _error_of([*fast, *_image_overrides(root, tmp_path, "datamodule.n_classes=2")], tmp_path / "run")
    assert "do not fill one batch of datamodule.batch_size=128" in message


def test_a_run_without_test_cases_is_refused_before_training(fast, tmp_path):
    """testmodules=none on the quick-start: no OOD test set, so results.csv would be empty."""
    message = _error_of([*fast, "testmodules=none"], tmp_path / "run")
    assert "no OOD test cases" in message and "testmodules=" in message
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize(
    "override, how",
    [
        ("trainer.gpus=1", "drop trainer.gpus or set trainer.gpus=0"),
        ("trainer.accelerator=cuda", "set trainer.accelerator=cpu (or auto)"),
    ],
)
def test_a_gpu_asked_for_without_one_is_one_line_saying_how_to_use_the_cpu(override, how, fast, tmp_path):
    """Issue 32: today `error: trainer: No supported gpu backend found!` with no hint."""
    message = _error_of([*fast, override], tmp_path / "run")
    assert message.startswith(f"error: {override} asks for a GPU, but no GPU was found") and message.endswith(how), (
        message
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


def _read_only_folder(tmp_path: Path) -> Path:
    """A folder in which nothing can be created (root ignores file modes: a read-only mount then)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder / "logs"
    for candidate in (Path("/sys/fs/mchad-test"), Path("/proc/mchad-test")):
        try:
            candidate.mkdir(parents=True)
        except OSError:
            return candidate / "logs"
        candidate.rmdir()
    pytest.skip("no read-only folder to test with")


def test_read_only_log_folder_is_one_line(tmp_path):
    """Today: a 33-line traceback ending in OSError: [Errno 30]."""
    folder = _read_only_folder(tmp_path)
    line = _one_line_cli_error(f"paths.log_dir={folder}")
    assert line.startswith("error: cannot write ") and "paths.log_dir=" in line
    named = Path(line.removeprefix("error: cannot write ").split(":")[0])
    assert named == folder or named in folder.parents  # the folder, or the part of it that cannot be made


def test_a_value_mistake_is_one_line_before_torch_is_imported(tmp_path):
    """A fresh run's config values are checked before the heavy imports: the one line comes after
    about 0.6 s instead of 4.4 s (torch and Lightning are never imported), FAILED.txt as ever."""
    logs = tmp_path / "logs"
    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(ROOT / "run.py"), "datamodule.batch_size=0", f"paths.log_dir={logs}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    imported = imported_modules(result.stderr)
    assert "mchad.runs.validate" in imported and not {"torch", "pytorch_lightning"} & imported
    lines = console_lines(result.stderr)
    assert lines == ["error: datamodule.batch_size must be >= 1, got 0"]
    (failed,) = logs.rglob("FAILED.txt")
    assert failed.read_text().splitlines()[0] == lines[0]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("trainer.max_epoch=3", "error: unknown key trainer.max_epoch (did you mean trainer.max_epochs"),
        ("modle.margin=2", "error: unknown key modle.margin (did you mean model.margin"),
        ("experiment=cifar10-mchd", "error: no experiment 'cifar10-mchd' (did you mean experiment=cifar10-mchad"),
        ("model=mchd", "error: no model 'mchd' (did you mean model=mchad"),
        ("seed", "error: cannot parse the command line"),
    ],
    ids=["misspelled-key", "misspelled-group", "unknown-experiment", "unknown-method", "no-equals"],
)
def test_config_mistakes_are_one_line_with_the_closest_name(override, expected, tmp_path):
    """Today: Hydra's 7- to 33-line output."""
    assert _one_line_cli_error(override, f"paths.log_dir={tmp_path}").startswith(expected)
    assert not list(tmp_path.rglob("results.csv"))


def test_a_bug_shows_its_traceback_and_an_input_mistake_does_not(capsys, monkeypatch):
    from mchad.cli import guard
    from mchad.errors import ConfigError

    def bug():
        raise ZeroDivisionError("boom")

    def mistake():
        raise ConfigError("model.margin must be >= 0")

    for function, traceback_shown, last in (
        (bug, True, "error: internal error, a bug (ZeroDivisionError: boom); the traceback is above"),
        (mistake, False, "error: model.margin must be >= 0"),
    ):
        with pytest.raises(SystemExit) as info:
            guard(function, ROOT / "config")
        assert info.value.code == 1
        err = capsys.readouterr().err
        assert ("Traceback" in err) == traceback_shown
        assert err.strip().splitlines()[-1] == last
    monkeypatch.setenv("MCHAD_TRACEBACK", "1")
    with pytest.raises(SystemExit):
        guard(mistake, ROOT / "config")
    assert "Traceback" in capsys.readouterr().err


# ------------------------------------------------------------------- image folders say what they do


def test_image_folder_names_skipped_files_and_empty_class_folders(tmp_path, caplog):
    """Today both were skipped without a word."""
    from mchad.data import ImageFolderSource

    root = make_image_folder(tmp_path / "images", classes=3, per_class=4, splits=("train",))
    (root / "train" / "class0" / "notes.txt").write_text("not an image")
    (root / "train" / "class1" / "labels.csv").write_text("a,b")
    (root / "train" / "class1" / ".DS_Store").write_bytes(b"hidden files are not mentioned")
    (root / "train" / "empty").mkdir()
    with caplog.at_level(logging.WARNING, logger="mchad"):
        array = ImageFolderSource(str(root), split="train", size=32).load(tmp_path / "data")
    assert len(array) == 12
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    skipped, empty = warnings
    assert skipped.startswith(f"{root / 'train'}: skipped 2 file(s) that are not images")
    assert empty == f"{root / 'train'}: class folder(s) empty hold no images and are skipped"


def test_rgb_folder_as_test_case_of_the_digits_model_is_announced(tmp_path, caplog, monkeypatch):
    """An RGB 40x40 folder tested against the 1x8x8 digits model: today silently converted,
    with a progress bar "decoding <another dataset's name>"."""
    from hydra.utils import instantiate

    import mchad.data.sources as sources

    folder = tmp_path / "my-photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    bars = []
    monkeypatch.setattr(sources, "progress", lambda items, total, desc: bars.append(desc) or items)
    cfg = compose_config(
        [
            "testmodules=[digits,imagefolder]",
            f"datamodule.test_cases.ImageFolder.root={folder}",
            f"dataset_dir={tmp_path / 'data'}",
        ]
    )
    datamodule = instantiate(cfg.datamodule)
    with caplog.at_level(logging.WARNING, logger="mchad"):
        datamodule.setup("fit")
    assert datamodule.test_cases["ImageFolder"].images.shape[1:] == (1, 8, 8)
    assert bars == [f"decoding {folder}"]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning == f"test case ImageFolder: {folder}: 5 images of 3x32x32 converted to the model's input shape 1x8x8"


def _no_decoding():
    """A context that fails if anything is decoded inside it."""
    import contextlib

    import mchad.data.sources as sources

    @contextlib.contextmanager
    def check():
        before = sources.DECODED_IMAGES
        yield
        assert sources.DECODED_IMAGES == before, "images were decoded before the mistake was found"

    return check()


def test_a_class_folder_missing_from_train_is_refused_before_decoding(fast, tmp_path):
    """Issue 32: `train/class1` removed while `test/class1` stays. Today train numbered 2 classes
    and test 3 (every label from class1 on shifted by one) and the run exited 0."""
    root = make_image_folder(tmp_path / "images", classes=3, per_class=8)
    shutil.rmtree(root / "train" / "class1")
    with _no_decoding():
        message = _error_of([*fast, *_image_overrides(root, tmp_path, "datamodule.batch_size=4")], tmp_path / "run")
    assert "the classes of train" in message and "test has class1, which train lacks" in message
    (root / "test" / "class1").rename(root / "test" / "other")
    shutil.rmtree(root / "test" / "class2")
    with _no_decoding():
        message = _error_of([*fast, *_image_overrides(root, tmp_path, "datamodule.n_classes=2")], tmp_path / "run2")
    assert "test has other, which train lacks; test lacks class2" in message


def test_n_classes_follows_the_image_folder_and_a_different_one_is_refused(fast, tmp_path):
    """Issue 32: a 5-class folder trained with the inherited n_classes=10 (5 centres never used)."""
    from mchad.runs.train import with_n_classes

    root = make_image_folder(tmp_path / "images", classes=5, per_class=2)
    cfg = compose_config(["datamodule=imagefolder", f"datamodule.root={root}"], tmp_path / "run")
    assert cfg.datamodule.n_classes is None
    cfg = with_n_classes(cfg)
    assert cfg.datamodule.n_classes == 5 and cfg.model.method.n_classes == 5
    overrides = [
        "datamodule=imagefolder",
        f"datamodule.root={root}",
        f"dataset_dir={tmp_path / 'data'}",
        "testmodules=noise",
    ]
    with _no_decoding():
        message = _error_of([*fast, *overrides, "datamodule.n_classes=10"], tmp_path / "run2")
    assert message == (
        f"error: datamodule.n_classes=10 but {root / 'train'} has 5 classes; drop datamodule.n_classes "
        "(it follows from the data) or set it to 5"
    )


def test_n_classes_of_a_known_dataset_is_checked_without_its_data(fast, tmp_path):
    """CIFAR10 with n_classes=5: refused before the data are even looked for (today: after
    loading, and n_classes=100 passed)."""
    for wrong in (5, 100):
        message = _error_of(
            [
                *fast,
                "experiment=cifar10-mchad",
                "model/backbone=convnet",
                f"datamodule.n_classes={wrong}",
                f"dataset_dir={tmp_path / 'nodata'}",
            ],
            tmp_path / f"run{wrong}",
        )
        assert f"datamodule.n_classes={wrong} but CIFAR10 has 10 classes" in message


def test_open_set_splits_of_an_image_folder_must_name_the_same_classes(tmp_path):
    """The known/unknown lists index the training folder's classes: a test folder without
    `cat` is refused (before decoding) instead of shifting the unknown classes."""
    from mchad.data import ImageFolderSource, OpenSetDataModule
    from mchad.data.osr import CIFAR10_CLASSES
    from mchad.errors import DataError

    root = tmp_path / "cifar"
    for split in ("train", "test"):
        for name in CIFAR10_CLASSES:
            (root / split / name).mkdir(parents=True)
    (root / "test" / "cat").rmdir()
    datamodule = OpenSetDataModule(
        setting="cifar10",
        split=0,
        train=ImageFolderSource(str(root), "train"),
        test=ImageFolderSource(str(root), "test"),
        n_classes=6,
        name="CIFAR10 6/4",
        dataset_dir=str(tmp_path / "data"),
    )
    with _no_decoding(), pytest.raises(DataError, match="test lacks cat"):
        datamodule.setup("fit")


# ------------------------------------------------------------------ failed and interrupted runs


def _write_fake_results(run_dir: Path) -> None:
    (run_dir / ".hydra").mkdir(parents=True)
    row = {
        "experiment": "digits-mchad",
        "id_dataset": "Digits",
        "method": "MCHAD",
        "test_case": "GaussianNoise",
        "score": "distance",
        "seed": 1,
        "Accuracy": 0.9,
        "AUROC": 0.9,
        "AUPR-IN": 0.9,
        "AUPR-OUT": 0.9,
        "FPR95": 0.1,
        "evaluated_from": "",
    }
    with open(run_dir / "results.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        writer.writerow(row)


def test_failed_single_run_writes_its_cause_and_the_aggregation_reports_it(failed_run, tmp_path, capsys):
    """Today: config.yaml and run.log but no cause; the aggregation listed it as "missing"."""
    from mchad.results import aggregate

    assert failed_run.returncode == 1
    lines = failed_run.console().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), failed_run.console()[-2000:]
    logs = tmp_path / "logs"
    shutil.copytree(failed_run.logs, logs)  # the aggregation below writes beside it
    (run_dir,) = (logs / "runs").glob("*/*")
    assert (run_dir / "FAILED.txt").read_text().splitlines()[0] == lines[0]
    _write_fake_results(logs / "runs" / "other" / "finished")
    assert aggregate.main([str(logs / "runs")]) == 0
    out = capsys.readouterr().out
    assert f"failed: {run_dir}" in out and "FAILED: model.method: margin must be >= 0, got -1" in out


def test_ctrl_c_says_how_to_resume(fast, tmp_path, monkeypatch, capsys):
    """Today: "graceful shutdown" and exit 1, no word of resume=."""
    from mchad.models.module import OODModel

    original = OODModel.on_train_batch_start

    def ctrl_c(self, batch, batch_idx):
        if self.current_epoch == 1 and batch_idx == 1:
            raise KeyboardInterrupt
        return original(self, batch, batch_idx)

    monkeypatch.setattr(OODModel, "on_train_batch_start", ctrl_c)
    folder = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        main(compose_config(fast, folder))
    assert info.value.code == 130
    hint = f"interrupted; continue this run with: python run.py resume={folder}"
    assert capsys.readouterr().err.strip().splitlines() == [hint]
    assert (folder / "FAILED.txt").read_text().startswith(f"error: {hint}")
    assert not (folder / "results.csv").exists()


# ------------------------------------------------------------------------------- results.csv


def test_results_name_what_ran_and_eval_only_rows_belong_to_their_checkpoint(fast, tmp_path):
    """`model=cac` on the digits is digits-cac (today: digits-mchad); an eval-only run of a seed-7
    model records seed 7 (today: the command's seed 1) and the checkpoint it evaluated; the
    aggregation counts that model once."""
    from mchad.results.read_results import find_results

    trained = tmp_path / "runs" / "trained"
    frame = pd.read_csv(run(compose_config([*fast, "model=cac", "seed=7"], trained)))
    assert (frame.experiment == "digits-cac").all() and (frame.seed == 7).all()
    assert frame.evaluated_from.isna().all()
    evaluated = pd.read_csv(
        run(compose_config([*fast, "model=cac", "train=false", f"ckpt_path={trained}"], tmp_path / "runs" / "eval"))
    )
    assert (evaluated.seed == 7).all() and (evaluated.experiment == "digits-cac").all()
    assert (evaluated.evaluated_from == str(trained / "checkpoints" / "last.ckpt")).all()
    results, _ = find_results(tmp_path / "runs")
    assert len(results) == len(frame) and set(results.run_dir) == {str(trained)}


# ------------------------------------------------------------------- scripts, notebook, console


def test_bash_dry_run_anywhere_prints_commands_without_escapes():
    """Today `--dry-run` after other arguments went on to run.py (argparse exit 2), and the
    printed commands read `experiment=cifar10-mchad\\,cifar10-gmchad`."""
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    result = subprocess.run(
        ["bash", str(ROOT / "bash" / "run-vary-radius.sh"), "trainer.gpus=1", "--dry-run"],
        env={**os.environ, "PYTHON": sys.executable, "RADII": "0,1", "SEEDS": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    assert line == (
        f"+ {sys.executable} {ROOT / 'run.py'} -m experiment=cifar10-mchad,cifar10-gmchad "
        "model.radius=0,1 seed=1 trainer.gpus=1"
    )


def test_notebook_runs(tmp_path, monkeypatch):
    """notebooks/eval.ipynb after `pip install -e .[notebook]` (skipped without Jupyter)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    for seed in (1, 2):
        _write_fake_results(tmp_path / "logs" / str(seed))
    notebook = nbformat.read(ROOT / "notebooks" / "eval.ipynb", as_version=4)
    (settings,) = [c for c in notebook.cells if c.cell_type == "code" and c.source.lstrip().startswith("from pathlib")]
    assert 'LOGS = "logs/multiruns"' in settings.source
    settings.source = settings.source.replace('LOGS = "logs/multiruns"', f"LOGS = {str(tmp_path / 'logs')!r}")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    nbclient.NotebookClient(notebook, timeout=300, resources={"metadata": {"path": str(ROOT)}}).execute()
    assert (tmp_path / "logs" / "aggregate" / "table.md").is_file()


def test_console_is_quiet_when_not_a_terminal(piped_run):
    """A run whose output goes to a pipe: today ~32 KB of progress bars for the quick-start, a
    Lightning deprecation warning, a litlogger tip and limit_* notices. Now only this
    package's lines; run.log keeps everything."""
    assert piped_run.returncode == 0, piped_run.stderr[-2000:]
    assert piped_run.stderr == ""
    for noise in ("it/s", "\r", "litlogger", "limit_train_batches", "GPU available", "deprecated"):
        assert noise not in piped_run.stdout, noise
    assert len(piped_run.stdout) < 3000
    (log,) = piped_run.logs.glob("runs/*/*/run.log")
    text = log.read_text()
    assert "litlogger" in text and "deprecated" in text
