"""Fetching data once and safely (issue 40): a loopback HTTP server stands in for the download site.

The test builds a tiny CIFAR-10 in torchvision's format (``cifar-10-python.tar.gz`` holding the
pickled batches) and serves it from 127.0.0.1; torchvision's URL and MD5 sums are patched to
it, in this process (monkeypatch) or, for the processes a test starts, by a ``sitecustomize``
module the test writes (:func:`child_env`). No other network is used.

``python tests/test_prepare.py [SRC [SECONDS]]`` measures the four-process case (downloads,
seconds) with the ``mchad`` package in ``SRC`` (default: this tree's src/, e.g. an export of
main's), the site taking ``SECONDS`` (default 0.5) to send the file.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import logging
import os
import pickle
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import RUN_PLACE_VARIABLES
from forked_runs import run_py, start_python

ROOT = Path(__file__).resolve().parents[1]
BASE = "cifar-10-batches-py"
ARCHIVE = "cifar-10-python.tar.gz"
TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
#: images per batch file: 5 x 40 training images, 40 test images
PER_BATCH = 40
#: a URL where nothing answers (the discard port of loopback): a download there fails at once
NOWHERE = "http://127.0.0.1:9/"


# ----------------------------------------------------------------------------- the tiny data set


def tiny_cifar10() -> tuple[bytes, dict]:
    """``(archive bytes, torchvision's CIFAR10 attributes for it)``: url left to the caller."""
    rng = np.random.default_rng(0)
    members, md5 = {}, {}
    for name in [*TRAIN, "test_batch"]:
        batch = {
            "data": rng.integers(0, 256, (PER_BATCH, 3072), dtype=np.uint8),
            "labels": [int(x) for x in rng.integers(0, 10, PER_BATCH)],
        }
        members[name] = pickle.dumps(batch)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    members["batches.meta"] = pickle.dumps({"label_names": names})
    for name, data in members.items():
        md5[name] = hashlib.md5(data).hexdigest()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"{BASE}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    archive = buffer.getvalue()
    attributes = {
        "tgz_md5": hashlib.md5(archive).hexdigest(),
        "train_list": [[n, md5[n]] for n in TRAIN],
        "test_list": [["test_batch", md5["test_batch"]]],
        "meta": {"filename": "batches.meta", "key": "label_names", "md5": md5["batches.meta"]},
    }
    return archive, attributes


def tiny_lsun_crop(count: int = 12) -> tuple[bytes, dict]:
    """pytorch-ood's LSUNCrop archive (``LSUN/test/*.jpg``) with ``count`` 36x36 images, and
    the class attributes for it."""
    from PIL import Image

    rng = np.random.default_rng(1)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for i in range(count):
            image = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(image, format="JPEG")
            info = tarfile.TarInfo(f"LSUN/test/{i:03d}.jpg")
            info.size = image.tell()
            tar.addfile(info, io.BytesIO(image.getvalue()))
    archive = buffer.getvalue()
    return archive, {"tgz_md5": hashlib.md5(archive).hexdigest()}


SITECUSTOMIZE = """
import importlib.abc, importlib.util, json, os, sys

PATCHES = json.loads(os.environ.get("MCHAD_TEST_PATCHES", "{}"))


class Patcher(importlib.abc.MetaPathFinder):
    # patches a module's classes once it is imported, not before: Ray's own processes, which
    # never import them, start as fast as without the patches
    def find_spec(self, fullname, path, target=None):
        if not any(name.rsplit(".", 1)[0] == fullname for name in PATCHES):
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


def patch(module):
    for name, values in PATCHES.items():
        if name.rsplit(".", 1)[0] == module.__name__:
            for key, value in values.items():
                setattr(getattr(module, name.rsplit(".", 1)[1]), key, value)


if PATCHES:
    sys.meta_path.insert(0, Patcher())
    # a process forked from one that has imported them (tests/forked_runs.py): patched now
    for module in {sys.modules.get(name.rsplit(".", 1)[0]) for name in PATCHES} - {None}:
        patch(module)
"""
CIFAR10_CLASS = "torchvision.datasets.CIFAR10"
LSUN_CLASS = "pytorch_ood.dataset.img.LSUNCrop"


def child_env(folder: Path, patches: dict[str, dict], src: Path = ROOT / "src") -> dict[str, str]:
    """The environment of a process started by a test: the package from ``src`` and the
    libraries' dataset classes patched at start-up (``patches``: {class: {attribute: value}},
    applied by a ``sitecustomize`` in ``folder``, which Python imports first; Ray's workers too)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {k: v for k, v in os.environ.items() if k not in RUN_PLACE_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join([str(folder), str(src)])
    env["MCHAD_TEST_PATCHES"] = json.dumps(patches)
    env["PYTHONWARNINGS"] = "ignore::DeprecationWarning"
    return env


def patch_classes(monkeypatch, patches: dict[str, dict]) -> None:
    """``patches`` (as for :func:`child_env`) in this process."""
    for name, values in patches.items():
        for key, value in values.items():
            monkeypatch.setattr(f"{name}.{key}", value)


# ----------------------------------------------------------------------------- the download site


class Site:
    """A threading HTTP server on 127.0.0.1 serving ``files`` ({name: bytes}).

    ``downloads`` counts the requests that fetch a file (torchvision first opens the URL once
    to follow redirects, with a ``Method: HEAD`` header on a GET: those are counted in
    ``probes``). The first ``cut`` downloads send half the file, then close the connection;
    ``seconds``: how long one download takes (sent in 20 parts), like a real site.
    """

    def __init__(self, files: dict[str, bytes], cut: int = 0, seconds: float = 0.0):
        self.files, self.cut, self.seconds = files, cut, seconds
        self.downloads, self.probes = 0, 0
        self.lock = threading.Lock()
        site = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                site.serve(self)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{name}"

    def serve(self, request) -> None:
        data = self.files.get(request.path.lstrip("/"))
        if data is None:
            request.send_error(404)
            return
        probe = request.headers.get("Method") == "HEAD"
        with self.lock:
            if probe:
                self.probes += 1
            else:
                self.downloads += 1
            cut = not probe and self.downloads <= self.cut
        request.send_response(200)
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        if probe:
            return
        body = data[: len(data) // 2] if cut else data
        parts = 20
        for i in range(parts):
            request.wfile.write(body[i * len(body) // parts : (i + 1) * len(body) // parts])
            time.sleep(self.seconds / parts)
        if cut:
            request.close_connection = True

    def __enter__(self) -> Site:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def cifar10():
    """``(archive bytes, CIFAR10 attributes without the url)``."""
    return tiny_cifar10()


# ----------------------------------------------------------------------------- several processes meet

LOAD = """
import hashlib, sys
from mchad.runs.collector import import_heavy
import_heavy("mchad.data.sources")  # torch and torchvision, as the project's commands import them
from mchad.data.sources import TorchvisionSource
array = TorchvisionSource("CIFAR10", sys.argv[2]).load(sys.argv[1])
print(hashlib.sha256(array.images.numpy().tobytes() + array.labels.numpy().tobytes()).hexdigest())
"""


def load_in_processes(dataset_dir: Path, env: dict[str, str], count: int, split: str = "train"):
    """Start ``count`` processes at the same moment, each loading CIFAR10 from ``dataset_dir``:
    ``(their results, seconds until the last ended)``."""
    start = time.perf_counter()
    started = [start_python(["-c", LOAD, str(dataset_dir), split], cwd=os.getcwd(), env=env) for _ in range(count)]
    ended = [process.wait(300) for process in started]
    return [(end.returncode, end.stdout, end.stderr) for end in ended], time.perf_counter() - start


def test_four_processes_on_an_empty_folder_download_once_and_read_the_same_data(tmp_path, cifar10):
    archive, attributes = cifar10
    with Site({ARCHIVE: archive}, seconds=0.5) as site:
        env = child_env(tmp_path / "site", {CIFAR10_CLASS: {**attributes, "url": site.url(ARCHIVE)}})
        results, _ = load_in_processes(tmp_path / "data", env, 4)
    for code, _out, err in results:
        assert code == 0, err[-2000:]
    assert site.downloads == 1, [err[-500:] for _, _, err in results]
    assert len({out.strip() for _, out, _ in results}) == 1
    assert not list((tmp_path / "data").glob(".fetching-*"))  # no temporary folder left


# ----------------------------------------------------------------------------- cut connections, bad files


def _load(dataset_dir: Path, split: str = "train"):
    from mchad.data.sources import TorchvisionSource

    return TorchvisionSource("CIFAR10", split).load(dataset_dir)


def test_a_cut_connection_is_fetched_again(tmp_path, cifar10, monkeypatch):
    archive, attributes = cifar10
    with Site({ARCHIVE: archive}, cut=1) as site:
        patch_classes(monkeypatch, {CIFAR10_CLASS: {**attributes, "url": site.url(ARCHIVE)}})
        array = _load(tmp_path)
    assert site.downloads == 2 and len(array) == len(TRAIN) * PER_BATCH
    assert hashlib.md5((tmp_path / ARCHIVE).read_bytes()).hexdigest() == attributes["tgz_md5"]
    assert not list(tmp_path.glob(".fetching-*"))


def test_a_site_that_always_cuts_stops_with_one_line_and_leaves_no_file(tmp_path, cifar10, monkeypatch):
    from mchad.errors import DataNotFoundError

    archive, attributes = cifar10
    with Site({ARCHIVE: archive}, cut=99) as site:
        patch_classes(monkeypatch, {CIFAR10_CLASS: {**attributes, "url": site.url(ARCHIVE)}})
        with pytest.raises(DataNotFoundError) as error:
            _load(tmp_path)
    message = str(error.value)
    assert "\n" not in message and "CIFAR10 (train) not found in" in message and "download failed 2 times" in message
    assert site.downloads == 2
    # the half-written archive was never put where a reader looks
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == []
    assert not list(tmp_path.glob(".fetching-*"))


def test_a_truncated_archive_in_place_is_fetched_again(tmp_path, cifar10, monkeypatch):
    archive, attributes = cifar10
    (tmp_path / ARCHIVE).write_bytes(archive[: len(archive) // 3])  # an earlier, interrupted download
    with Site({ARCHIVE: archive}) as site:
        patch_classes(monkeypatch, {CIFAR10_CLASS: {**attributes, "url": site.url(ARCHIVE)}})
        first = _load(tmp_path)
        again = _load(tmp_path, "test")
    assert site.downloads == 1 and len(first) == 200 and len(again) == PER_BATCH
    assert (tmp_path / ARCHIVE).read_bytes() == archive


def test_offline_a_truncated_archive_is_named_in_one_line(tmp_path, cifar10, monkeypatch):
    from mchad.errors import DataNotFoundError

    archive, attributes = cifar10
    (tmp_path / ARCHIVE).write_bytes(archive[:1000])
    patch_classes(monkeypatch, {CIFAR10_CLASS: {**attributes, "url": NOWHERE + ARCHIVE}})
    with pytest.raises(DataNotFoundError) as error:
        _load(tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert f"{tmp_path / ARCHIVE} MD5 differs from the library's (incomplete or corrupted)" in message
    assert "mchad.data.prepare" in message
    assert (tmp_path / ARCHIVE).stat().st_size == 1000  # not overwritten by a failed download


def test_a_second_process_waits_for_the_lock_and_builds_nothing(tmp_path):
    """The decoded cache: while one holds its lock (building), another waits, then loads what
    the first wrote instead of decoding again."""
    import torch

    from mchad.data.fetch import locked
    from mchad.data.sources import ImageArray, _cache_file, _cached

    built, results = [], []

    def build():
        built.append(1)
        return ImageArray(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.long))

    path = _cache_file(tmp_path, "key")
    with locked(path.parent, path.stem):  # this thread plays the first process, building
        waiter = threading.Thread(target=lambda: results.append(_cached(tmp_path, "key", build)))
        waiter.start()
        time.sleep(0.5)
        assert waiter.is_alive() and not built  # waiting for the lock, not decoding
        images = torch.ones(3, 3, 4, 4, dtype=torch.uint8)
        torch.save({"images": images, "labels": torch.zeros(3, dtype=torch.long), "key": "key"}, path)
    waiter.join(10)
    assert not built and len(results[0]) == 3  # it loaded the first one's cache


def test_a_verified_archive_without_its_folder_is_unpacked_without_network(tmp_path, monkeypatch):
    """pytorch-ood extracts only what it downloads: a verified archive whose folder is gone
    (an interrupted extraction) is unpacked from the archive, nothing fetched."""
    from mchad.data.sources import PytorchOODSource

    archive, attributes = tiny_lsun_crop()
    (tmp_path / "LSUN.tar.gz").write_bytes(archive)
    patch_classes(monkeypatch, {LSUN_CLASS: {**attributes, "url": NOWHERE + "LSUN.tar.gz"}})
    array = PytorchOODSource("LSUNCrop").load(tmp_path)
    assert tuple(array.images.shape) == (12, 3, 32, 32) and (tmp_path / "LSUN" / "test").is_dir()


# ----------------------------------------------------------------------------- the prepare command

#: cifar10-mchad with one of its five downloaded OOD sets (LSUNCrop, served tiny) and the noise sets
PREPARE_ARGS = ["experiment=cifar10-mchad"] + [
    f"~datamodule.test_cases.{name}" for name in ("Textures", "TinyImageNetCrop", "TinyImageNetResize", "LSUNResize")
]


def _prepare(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return start_python(["-m", "mchad.data.prepare", *args], cwd=cwd, env=env).wait(600)


def test_prepare_offline_with_nothing_names_each_missing_data_set_in_one_line(tmp_path, capsys):
    from mchad.data.prepare import main

    assert main(["--offline", "experiment=cifar10-mchad", f"dataset_dir={tmp_path / 'data'}"]) == 1
    out, err = capsys.readouterr()
    missing = [line for line in err.splitlines() if line.startswith("missing: ")]
    names = ["CIFAR10", "Textures", "TinyImageNetCrop", "TinyImageNetResize", "LSUNCrop", "LSUNResize"]
    assert [line.split()[1] for line in missing] == names, err[-3000:]
    assert all(f"not found in {tmp_path / 'data'}" in line and "Download it" in line for line in missing)
    assert "cifar-10-python.tar.gz absent" in missing[0]
    table = out.splitlines()
    assert table[0].split()[:2] == ["data", "set"] and sum("MISSING" in line for line in table) == 7  # 2 CIFAR splits


def test_prepare_names_an_input_mistake_in_one_line(capsys):
    from mchad.data.prepare import main

    for args, expected in (
        (["experiment=nope"], "Could not find 'experiment/nope'"),
        (["datamodule.val_fraction=2"], "datamodule.val_fraction must be in (0, 1), got 2"),
    ):
        assert main(["--offline", *args]) == 1
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith("error: ") and expected in line


def test_the_prepare_command_exits_1_with_one_line(tmp_path):
    """``python -m mchad.data.prepare`` as typed (the tests above call its ``main``)."""
    result = _prepare(["--offline", "experiment=nope"], tmp_path, child_env(tmp_path / "site", {}))
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ") and "Could not find 'experiment/nope'" in line


def test_prepare_fetches_once_then_finds_everything_without_network(tmp_path, monkeypatch, capsys, caplog):
    from mchad.data.prepare import main

    cifar, cifar_attributes = tiny_cifar10()
    lsun, lsun_attributes = tiny_lsun_crop()
    data = tmp_path / "data"
    caplog.set_level(logging.INFO, logger="mchad")  # what the command prints: the data sets' lines too
    with Site({ARCHIVE: cifar, "LSUN.tar.gz": lsun}) as site:
        patch_classes(
            monkeypatch,
            {
                CIFAR10_CLASS: {**cifar_attributes, "url": site.url(ARCHIVE)},
                LSUN_CLASS: {**lsun_attributes, "url": site.url("LSUN.tar.gz")},
            },
        )
        assert main([*PREPARE_ARGS, f"dataset_dir={data}"]) == 0, capsys.readouterr().err[-3000:]
        assert (site.downloads, site.probes) == (2, 2)
        capsys.readouterr()
        caplog.clear()
        assert main([*PREPARE_ARGS, f"dataset_dir={data}"]) == 0, capsys.readouterr().err[-3000:]
        assert (site.downloads, site.probes) == (2, 2)  # no network used the second time
    out, err = capsys.readouterr()
    rows = {line.split()[0] + line.split()[1]: line.split() for line in out.splitlines()[1:]}
    assert rows["CIFAR10(train)"][-1] == "ok" and rows["CIFAR10(train)"][3] == "200"
    assert rows["CIFAR10(test)"][3] == "40" and rows["LSUNCropood/LSUNCrop"][2:4] == ["12", "1"]
    assert rows["LSUNCropood/LSUNCrop"][-1] == "ok"
    assert "missing" not in err
    # the decoded cache of LSUNCrop was built by the first, loaded by the second
    assert "LSUNCrop: loaded 12 images from cache" in caplog.text


def test_the_pretrained_checkpoint_is_checked_and_a_missing_one_named(tmp_path, monkeypatch):
    import torch
    from omegaconf import OmegaConf

    from mchad.data.prepare import checkpoint_row

    weights = tmp_path / "imagenet_wrn_baseline_epoch_99.pt"
    weights.write_bytes(b"x" * 10)
    row = checkpoint_row(OmegaConf.create({"model": {"pretrained_checkpoint": str(weights)}}), offline=True)
    assert (row.files, row.size, row.error) == (1, 10, None)
    gone = checkpoint_row(OmegaConf.create({"model": {"pretrained_checkpoint": str(tmp_path / "x.pt")}}), True)
    assert "not found" in gone.error and "github.com/hendrycks/pre-training" in gone.error
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    name = "resnet-18/imagenet200/crossentropy/s0"  # a pytorch-ood model: torch.hub's file, offline absent
    hub = checkpoint_row(OmegaConf.create({"model": {"pretrained_checkpoint": name}}), offline=True)
    assert (
        hub.error.startswith("pretrained checkpoint resnet-18-imagenet200-crossentropy-s0-") and "offline" in hub.error
    )
    assert checkpoint_row(OmegaConf.create({"model": {"pretrained_checkpoint": None}}), True) is None


def test_the_sweep_scripts_prepare_before_they_sweep():
    for name in ("run-experiments.sh", "run-openood.sh", "run-openset.sh"):
        lines = (ROOT / "bash" / name).read_text().splitlines()
        prepare = [i for i, line in enumerate(lines) if "-m mchad.data.prepare" in line and not line.startswith("#")]
        sweep = [i for i, line in enumerate(lines) if '/run.py" -m' in line and line.startswith("run ")]
        assert len(prepare) == 1 and len(sweep) == 1 and prepare[0] < sweep[0], name
        assert lines[prepare[0]].endswith("|| exit 1"), name  # missing data: no sweep


# ----------------------------------------------------------------------------- sweeps

#: a sweep of tiny CIFAR-10 trials: one epoch, 200 noise images per test case
SWEEP_ARGS = [
    "datamodule=cifar10",
    "testmodules=noise",
    "datamodule.test_cases.GaussianNoise.n=200",
    "datamodule.test_cases.UniformNoise.n=200",
    "paths.log_dir=logs",
    "trainer.max_epochs=1",
    "trainer.min_epochs=1",
    "~logger",
    "~callbacks",
]


def _sweep(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}  # Ray on 127.0.0.1
    return run_py(["-m", *SWEEP_ARGS, *args], cwd=cwd, env=env)


def test_a_sweep_without_its_data_stops_before_any_trial_in_one_line(tmp_path, cifar10):
    """The driver prepares before it starts Ray: nothing to fetch offline means one line, exit 1."""
    _, attributes = cifar10
    env = child_env(tmp_path / "site", {CIFAR10_CLASS: {**attributes, "url": NOWHERE + ARCHIVE}})
    result = _sweep(["seed=1,2", f"dataset_dir={tmp_path / 'data'}"], tmp_path, env)
    assert result.returncode == 1
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    expected = f"error: no trial started: CIFAR10 (train) not found in {tmp_path / 'data'} (download failed 2"
    assert line.startswith(expected)
    assert not list((tmp_path / "logs").rglob("results.csv")) and "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["ray", "basic"])
def test_a_three_trial_sweep_on_an_empty_folder_downloads_once(tmp_path, cifar10, launcher):
    """Ray: the driver prepares, then three trials start together; basic: the first trial
    fetches, the next two find the data."""
    archive, attributes = cifar10
    with Site({ARCHIVE: archive}, seconds=0.5) as site:
        env = child_env(tmp_path / "site", {CIFAR10_CLASS: {**attributes, "url": site.url(ARCHIVE)}})
        args = ["seed=1,2,3", f"dataset_dir={tmp_path / 'data'}", f"hydra/launcher={launcher}"]
        result = _sweep(args, tmp_path, env)
    output = result.stdout + result.stderr
    if result.returncode != 0 and "in start_ray" in output:  # ray.init() failed: no Ray here
        pytest.skip(f"Ray could not start here: {output[-800:]}")
    assert result.returncode == 0, output[-3000:]
    assert site.downloads == 1
    assert len(list((tmp_path / "logs" / "multiruns").glob("*/*/results.csv"))) == 3


if __name__ == "__main__":  # the four-process measurement of the report
    import tempfile

    os.environ["MCHAD_TESTS_REAL_STARTS"] = "1"  # four interpreters of their own (tests/forked_runs.py)

    src = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT / "src"
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 0.5  # how long the site takes to send the file
    archive, attributes = tiny_cifar10()
    with tempfile.TemporaryDirectory() as tmp, Site({ARCHIVE: archive}, seconds=seconds) as site:
        env = child_env(Path(tmp) / "site", {CIFAR10_CLASS: {**attributes, "url": site.url(ARCHIVE)}}, src)
        results, wall = load_in_processes(Path(tmp) / "data", env, 4)
        ok = sum(code == 0 for code, _, _ in results)
        same = len({out.strip() for code, out, _ in results if code == 0})
    print(f"{src}: 4 processes on an empty dataset_dir: {site.downloads} download(s), {ok} of 4 succeeded, ")
    print(f"  {same} distinct result(s), {wall:.1f} s wall (archive {len(archive)} bytes, served in {seconds} s)")
    for code, _, err in results:
        if code:
            print("  failed:", err.strip().splitlines()[-1][:200])
