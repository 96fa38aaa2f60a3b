"""DDP (several processes): sharded training batches, joined test scores, one writer.

Loader tests run in this process. The end-to-end tests start `python run.py` with two CPU
processes (Lightning's DDP over gloo, its subprocess launcher) on the quick-start digits,
with tests/ddp_probe.py recording what each rank trained on.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT
from forked_runs import run_py
from ii_rank_probe import ii_batches, ii_rank
from rank_failure_probe import gone

from mchad.data.loaders import TensorBatchLoader
from mchad.data.sources import ImageArray
from mchad.distributed import RANK_VARIABLES, launch_rank, shard_bounds

TESTS = Path(__file__).resolve().parent
METRICS = ["Accuracy", "AUROC", "AUPR-IN", "AUPR-OUT", "FPR95", "OSCR"]


def _array(n: int) -> ImageArray:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1)
    return ImageArray(images, torch.arange(n) % 3, ["a", "b", "c"])


def _batches(n: int, batch_size: int, world_size: int, rank: int, **kwargs) -> list[list[int]]:
    loader = TensorBatchLoader(_array(n), batch_size, rank=rank, world_size=world_size, pin_memory=False, **kwargs)
    batches = [images.view(-1).tolist() for images, _ in loader]
    assert len(batches) == len(loader)
    return batches


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_training_batches_are_the_single_process_batches_split_over_the_ranks(world_size, drop_last):
    """Guards the sharding: at every step the ranks' parts together are exactly the batch one
    process takes (same seeded order for any world size), no sample twice, equal parts."""
    n, batch_size = 51, 12  # last batch: 3 rows (kept for 2 and 3 ranks, too small for 4)
    single = _batches(n, batch_size, 1, 0, shuffle=True, seed=7, drop_last=drop_last)
    parts = [
        _batches(n, batch_size, world_size, r, shuffle=True, seed=7, drop_last=drop_last) for r in range(world_size)
    ]
    steps = len(single) - (1 if not drop_last and world_size > 3 else 0)
    assert all(len(p) == steps for p in parts)  # every rank takes the same number of steps
    for step, batch in enumerate(single[:steps]):
        joined = [i for rank in range(world_size) for i in parts[rank][step]]
        assert joined == batch
        sizes = [len(parts[rank][step]) for rank in range(world_size)]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    seen = [i for p in parts for b in p for i in b]
    assert len(seen) == len(set(seen)) == sum(len(b) for b in single[:steps])
    assert len(seen) == (48 if drop_last or world_size > 3 else 51)


def test_a_last_batch_smaller_than_the_world_is_dropped():
    """50 = 4 x 12 + 2: with 3 ranks the 2-row last batch would leave a rank empty."""
    assert len(_batches(50, 12, 2, 0)) == 5
    for rank in range(3):
        assert len(_batches(50, 12, 3, rank)) == 4


@pytest.mark.parametrize("n", [0, 1, 7, 10])
def test_evaluation_parts_joined_in_rank_order_are_the_set(n):
    world_size = 3
    joined = [i for r in range(world_size) for b in _batches(n, 2, world_size, r, split="set") for i in b]
    assert joined == list(range(n))
    bounds = [shard_bounds(n, r, world_size) for r in range(world_size)]
    assert [stop - start for start, stop in bounds] == [len(x) for x in np.array_split(np.arange(n), world_size)]


def test_running_centres_follow_the_global_batch(tmp_path):
    """Guards II's all-reduced statistics: two processes, each with half of every batch, end
    with the running centres one process computes from the whole batches (II's BatchNorm
    is kept in eval mode so that only the centres' statistics differ between the ranks)."""
    import torch.multiprocessing as mp

    from mchad.models.methods import II

    def single() -> torch.Tensor:
        method = II(n_classes=3, n_embedding=4).train()
        method.norm.eval()
        for z, y in ii_batches():
            method.loss(method(z), y)
        return method.running.running_centers

    # spawn, not fork: a child forked after this process ran torch's OpenMP pool (any earlier
    # test) deadlocks in its first parallel op
    mp.start_processes(
        ii_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    centres = [torch.load(tmp_path / f"centres{r}.pt") for r in (0, 1)]
    torch.testing.assert_close(centres[0], centres[1])
    torch.testing.assert_close(centres[0], single())


@pytest.mark.parametrize(
    "env, name",
    [
        ({"WORLD_SIZE": "4", "TORCHELASTIC_RUN_ID": "abc"}, "ddp/torchrun-abc"),
        ({"WORLD_SIZE": "4", "TORCHELASTIC_RUN_ID": "none"}, None),  # torchrun without a rendezvous id
        ({"SLURM_NTASKS": "8", "SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0"}, "ddp/slurm-77.0"),
        ({"SLURM_NTASKS": "1", "SLURM_JOB_ID": "77"}, None),  # one task: a plain run
    ],
)
def test_the_processes_of_one_launch_share_a_run_folder(monkeypatch, env, name):
    """Guards the shared folder under torchrun/srun, where every process composes its own
    config: the folder name comes from the launch, not from the process id or the clock."""
    from mchad import resolvers

    for key in ("WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_JOB_ID", "SLURM_STEP_ID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(resolvers, "_RUN_NAME", None)
    if name is None:
        assert resolvers.run_name().endswith(f"_{resolvers.run_id()}")
    else:
        assert resolvers.run_name() == name


@pytest.mark.parametrize("same", [True, False])
def test_processes_with_different_run_folders_stop_before_training(tmp_path, same):
    """Guards the run-folder check: every rank compares its folder with rank 0's, and all stop
    together (a collective decision) when any differs."""
    from types import SimpleNamespace

    from mchad.errors import ConfigError
    from mchad.runs.train import SharedRunFolder

    rank0 = str((tmp_path / "a").resolve())
    decisions = []
    strategy = SimpleNamespace(
        broadcast=lambda value, src: rank0,
        reduce_boolean_decision=lambda decision, all: decisions.append(decision) or decision,
    )
    trainer = SimpleNamespace(world_size=2, strategy=strategy)
    check = SharedRunFolder(tmp_path / ("a" if same else "b"))
    if same:
        check.setup(trainer, None, "fit")
    else:
        with pytest.raises(ConfigError, match="different run folders"):
            check.setup(trainer, None, "fit")
    assert decisions == [same]


# ------------------------------------------------------------------------------ end to end


def _run(*overrides: str, cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return run_py(list(overrides), cwd=cwd, env=env, timeout=timeout)


def _quick(logs: Path, probe: Path | None = None, *more: str) -> list[str]:
    """The quick-start, tiny and fast, without augmentation (the probe identifies rows)."""
    args = [
        f"paths.log_dir={logs}",
        "trainer.accelerator=cpu",
        "trainer.max_epochs=2",
        "trainer.min_epochs=2",
        "trainer.enable_progress_bar=false",
        "datamodule.crop_padding=0",
        "~callbacks.validation_views",
        "~callbacks.embedding_animation",
        "~callbacks.test_plots",
    ]
    if probe is not None:
        args += [
            "+callbacks.probe._target_=ddp_probe.SampleProbe",
            "allowed_targets=[ddp_probe.*]",
            f"+callbacks.probe.out={probe}",
        ]
    return [*args, *more]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """II trained by two processes, then its checkpoint tested by one (`train=false`)."""
    tmp = tmp_path_factory.mktemp("ddp")
    logs, probe = tmp / "logs", tmp / "probe"
    # full_train_set: every training image in every epoch (the last, smaller batch kept)
    # a fitted detector too: its scores are joined like the method's
    detectors = "detectors=[energy,mahalanobis]"
    result = _run(
        *_quick(logs, probe, "model=ii", detectors, "trainer.devices=2", "+datamodule.full_train_set=true"), cwd=tmp
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p.parent for p in logs.glob("runs/*/*/config.yaml"))
    assert len(runs) == 1, runs
    single = _run(
        *_quick(
            logs / "single",
            None,
            "model=ii",
            detectors,
            "+datamodule.full_train_set=true",
            "train=false",
            f"ckpt_path={runs[0]}",
        ),
        cwd=tmp,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    return {"result": result, "run": runs[0], "probe": probe, "single": single, "logs": logs}


def test_two_processes_split_every_epoch_and_write_once(two_process_run):
    """Guards sharding and the one writer end to end: per epoch each rank trains on half the
    training images and together on all, each once; one results.csv, one printed table."""
    ranks = [json.loads((two_process_run["probe"] / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    everything = Counter(ranks[0]["all_rows"])
    assert len(everything) > 700  # the 724 digits training images 0-5 (a few duplicate rows)
    for epoch in ("0", "1"):
        parts = [Counter(r["epochs"][epoch]) for r in ranks]
        assert parts[0] + parts[1] == everything
        assert abs(sum(parts[0].values()) - sum(parts[1].values())) <= 1
    # batch_size 64 is global: 32 rows per rank, and half of the last, smaller batch each
    n = len(ranks[0]["all_rows"])
    assert n % 64 and ranks[0]["batch_sizes"] == ranks[1]["batch_sizes"] == ([32] * (n // 64) + [n % 64 // 2]) * 2
    run_dir = two_process_run["run"]
    logs = two_process_run["logs"]
    assert len(list(logs.glob("runs/**/results.csv"))) == len(list(logs.glob("runs/**/scores.npz"))) == 1
    assert not list(run_dir.glob("train_ddp_process_*"))
    out = two_process_run["result"].stdout + two_process_run["result"].stderr
    assert out.count("Results: ") == 1
    assert "sync_dist" not in out


def test_running_centres_are_equal_on_every_rank(two_process_run):
    """Guards II's all-reduced statistics: without them each rank's last update (from its half
    of the last batch) would leave different running centres."""
    centers = [json.loads((two_process_run["probe"] / f"rank{r}.json").read_text())["centers"] for r in (0, 1)]
    assert centers[0] is not None
    np.testing.assert_allclose(np.array(centers[0]), np.array(centers[1]), rtol=1e-6, atol=1e-7)


def test_two_process_metrics_equal_a_single_process_test_of_the_checkpoint(two_process_run):
    """Guards the joined test scores: every rank scored its part of each set; the metrics equal
    those of one process testing the same checkpoint."""
    ddp = pd.read_csv(two_process_run["run"] / "results.csv")
    single_runs = list((two_process_run["logs"] / "single").glob("runs/*/*/results.csv"))
    assert len(single_runs) == 1
    single = pd.read_csv(single_runs[0])
    keys = ["test_case", "score"]
    ddp, single = ddp.sort_values(keys).reset_index(drop=True), single.sort_values(keys).reset_index(drop=True)
    assert ddp[keys].equals(single[keys]) and len(ddp) == 3 * 4  # 3 test cases x (distance, msp, 2 detectors)
    np.testing.assert_allclose(ddp[METRICS].to_numpy(), single[METRICS].to_numpy(), rtol=1e-6, atol=1e-9)
    # the per-sample scores too, in the sets' order (the ranks' parts joined in rank order)
    with np.load(two_process_run["run"] / "scores.npz") as a, np.load(single_runs[0].parent / "scores.npz") as b:
        arrays = [key for key in a.files if not key.startswith("meta/")]
        assert sorted(arrays) == sorted(k for k in b.files if not k.startswith("meta/")) and len(arrays) > 12
        for key in arrays:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_every_rank(tmp_path):
    """Guards the NaN guard in DDP: rank 1's batch at step 3 turns NaN; both processes stop
    (no hang), with status 1, one `error:` line and no results.csv."""
    logs = tmp_path / "logs"
    overrides = _quick(
        logs, tmp_path / "probe", "trainer.devices=2", "+callbacks.probe.nan_rank=1", "+callbacks.probe.nan_step=3"
    )
    result = _run(*overrides, cwd=tmp_path, timeout=180)
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "at step 3" in errors[0], result.stderr[-3000:]
    assert not list(logs.glob("runs/**/results.csv"))
    (failed,) = list(logs.glob("runs/**/FAILED.txt"))  # rank 0's
    assert "at step 3" in failed.read_text()


@pytest.mark.slow
def test_resume_and_evaluation_only_in_two_processes(tmp_path):
    """Resume and `train=false` under DDP: one results.csv each, equal to one process's test."""
    logs = tmp_path / "logs"
    first = _run(*_quick(logs, None, "trainer.devices=2", "trainer.max_epochs=1", "trainer.min_epochs=1"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    (run_dir,) = [p.parent for p in logs.glob("runs/*/*/config.yaml")]
    resumed = _run(f"resume={run_dir}", "trainer.max_epochs=2", "trainer.devices=2", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (resumed.stdout + resumed.stderr).count("Results: ") == 1
    tested = _run(
        *_quick(logs / "eval2", None, "trainer.devices=2", "train=false", f"ckpt_path={run_dir}"), cwd=tmp_path
    )
    single = _run(*_quick(logs / "eval1", None, "train=false", f"ckpt_path={run_dir}"), cwd=tmp_path)
    assert tested.returncode == 0 and single.returncode == 0, tested.stderr[-3000:] + single.stderr[-3000:]
    (two,) = list((logs / "eval2").glob("runs/*/*/results.csv"))
    (one,) = list((logs / "eval1").glob("runs/*/*/results.csv"))
    keys = ["test_case", "score"]
    a, b = pd.read_csv(two).sort_values(keys), pd.read_csv(one).sort_values(keys)
    np.testing.assert_allclose(a[METRICS].to_numpy(), b[METRICS].to_numpy(), rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------ a rank fails


def test_a_failing_rank_stops_a_rank_waiting_in_a_collective_with_its_cause(tmp_path):
    """Guards the watchdog: rank 0, blocked in an all-reduce that rank 1 never joins, exits
    within seconds (status 1), writes rank 1's cause to FAILED.txt and prints it as the one
    `error:` line (spawned processes; the end-to-end version is the slow test below)."""
    import socket
    import time

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    from rank_failure_probe import failing_rank

    context = mp.start_processes(
        failing_rank, args=(2, port, str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    rank0, rank1 = context.processes
    try:
        rank0.join(timeout=90)
        ended = time.time()
        assert rank0.exitcode == 1
        assert rank1.is_alive()  # rank 0 did not wait for rank 1 to exit
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    seconds = ended - float((tmp_path / "failed.time").read_text())
    print(f"rank 1 announced its failure -> rank 0 gone: {seconds:.2f} s")
    assert seconds < 10
    assert (tmp_path / "FAILED.txt").read_text().splitlines()[0] == "error: rank 1 failed: ValueError: boom at step 5"
    assert not (tmp_path / "finished0").exists()


@pytest.mark.slow
def test_an_exception_on_rank_1_stops_both_ranks_with_its_cause(tmp_path):
    """`python run.py trainer.devices=2`, rank 1 raises at step 5: both processes are gone
    within 30 s, status 1, the one `error:` line and FAILED.txt name rank 1's exception."""
    import time

    logs, probe = tmp_path / "logs", tmp_path / "probe"
    overrides = _quick(logs, probe, "trainer.devices=2", "+callbacks.probe.fail_rank=1", "+callbacks.probe.fail_step=5")
    result = _run(*overrides, cwd=tmp_path, timeout=300)
    stderr = result.stderr
    pids = [int((probe / f"pid{rank}").read_text()) for rank in (0, 1)]
    deadline = time.time() + 30
    while not all(gone(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.05)
    ended = time.time()
    assert all(gone(pid) for pid in pids)
    assert result.returncode == 1, stderr[-3000:]
    seconds = ended - float((probe / "failed1.time").read_text())
    print(f"rank 1 failed -> last process gone: {seconds:.2f} s")
    assert seconds < 30
    cause = "rank 1 failed: ValueError: probe failure on rank 1 at step 5"
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {cause}"], stderr[-3000:]
    (failed,) = list(logs.glob("runs/**/FAILED.txt"))
    assert failed.read_text().splitlines()[0] == f"error: {cause}"


def test_the_rank_variables_are_the_ones_lightning_reads(monkeypatch):
    """launch_rank answers 0 without importing Lightning when none of RANK_VARIABLES is set: they
    must be where Lightning reads a launched process's rank from (and it reads no other)."""
    from lightning_fabric.utilities.rank_zero import _get_rank

    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for other in ("NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        monkeypatch.setenv(other, "3")
    assert _get_rank() is None and launch_rank() == 0  # Lightning's "started alone": rank 0
    for name in RANK_VARIABLES:
        monkeypatch.setenv(name, "2")
        assert _get_rank() == 2, name
        monkeypatch.delenv(name)
