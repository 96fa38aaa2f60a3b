"""The benchmark command runs end to end on synthetic data (what it prints is judged by
reading it; here: it runs, every section reports, and the start-up probe sees no Ray import
and no decoding)."""

import glob
import math
import tempfile

import pytest

from mchad import bench


def test_benchmark_runs_every_section_on_synthetic_data(capsys):
    before = set(glob.glob(f"{tempfile.gettempdir()}/mchad-bench-*"))
    report = bench.main([
        "--data", "synthetic", "--device", "cpu", "--steps", "2", "--warmup", "1", "--repeats", "1",
        "--batch-size", "32", "--data-batches", "5", "--eval-size", "64", "--eval-repeats", "1",
        "--startup-repeats", "1",
    ])
    out = capsys.readouterr().out
    for section in ("(a) training", "(b) data pipeline", "(c) testing", "(d) start-up"):
        assert section in out
    assert report["train"]["lightning"][0] > 0 and report["train"]["bare"][0] > 0
    assert math.isfinite(report["train"]["ratio"][0])
    assert min(report["data"]) > 0
    assert report["eval"]["rows"] > 0 and report["eval"]["cases"] == 7
    start = report["startup"]["quick-start (digits)"]
    assert 0 < start["seconds"][0] < 120
    assert start["ray_imported"] is False and start["decoded_images"] == 0
    assert set(start["phases"]) == {"to Trainer.fit", "sanity validation", "rest of fit set-up"}
    assert set(glob.glob(f"{tempfile.gettempdir()}/mchad-bench-*")) == before  # work folder removed


def test_unknown_section_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--only", "train,trian"])
    assert exit_info.value.code == 2
    assert "unknown section(s) trian" in capsys.readouterr().err
