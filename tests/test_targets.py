"""Config targets on an allow-list (mchad.targets): every target our configs name is allowed,
anything else is refused with one line before anything runs, and leaves no run folder."""

from __future__ import annotations

import pickle

import pytest
from conftest import ALL_EXPERIMENTS, compose_config
from omegaconf import OmegaConf
from test_robustness import run_cli

from mchad import registry
from mchad.errors import ConfigError
from mchad.targets import ALLOWED, allowed_patterns, check_targets, config_targets, is_allowed


class Planted:
    """A pickle payload: unpickling it writes a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


#: the experiment files and those generated from the method registry
EVERY_EXPERIMENT = sorted({*ALL_EXPERIMENTS, *(name for kind in registry.KINDS for name in registry.experiments(kind))})


@pytest.mark.parametrize("experiment", [None, *EVERY_EXPERIMENT])
def test_every_target_of_every_experiment_is_allowed(experiment):
    cfg = compose_config([] if experiment is None else [f"experiment={experiment}"])
    targets = [target for _, target in config_targets(cfg)]
    assert targets, "no target found: the walk sees nothing"
    check_targets(cfg)


def test_patterns_allow_below_a_package_or_one_exact_name():
    patterns = ["mchad.*", "pytorch_lightning.Trainer"]
    assert is_allowed("mchad.data.NoiseSource", patterns)
    assert is_allowed("pytorch_lightning.Trainer", patterns)
    assert not is_allowed("pytorch_lightning.Trainer2", patterns)
    assert not is_allowed("mchadx.evil", patterns)  # a prefix of the name is no package
    assert not is_allowed("torch.load", ALLOWED)


@pytest.mark.parametrize(
    "target", ["torch.load", "shutil.copy", "builtins.open", "os.system", "pickle.loads", "${oc.env:EVIL}"]
)
def test_targets_off_the_list_are_refused_naming_key_and_target(target):
    cfg = OmegaConf.create(
        {"model": {"method": {"_target_": "mchad.models.methods.MCHAD"}}, "callbacks": {"x": {"_target_": target}}}
    )
    with pytest.raises(ConfigError, match=r"^callbacks\.x\._target_=.* is not an allowed target"):
        check_targets(cfg)


def test_targets_in_lists_and_deep_nodes_are_found():
    cfg = OmegaConf.create({"a": [{"b": {"_target_": "shutil.copy"}}]})
    assert list(config_targets(cfg)) == [("a[0].b._target_", "shutil.copy")]
    with pytest.raises(ConfigError, match=r"a\[0\]\.b\._target_=shutil\.copy"):
        check_targets(cfg)


def test_allowed_targets_adds_a_users_package():
    cfg = OmegaConf.create({"allowed_targets": ["my_lab.*"], "callbacks": {"x": {"_target_": "my_lab.callbacks.Mine"}}})
    assert "my_lab.*" in allowed_patterns(cfg)
    check_targets(cfg)


def _assert_refused(result, key: str, target: str) -> None:
    assert result.returncode == 1, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}={target} is not an allowed target"), result.stderr[
        -2000:
    ]


def test_a_planted_pickle_through_torch_load_is_refused_without_running(tmp_path):
    marker, planted = tmp_path / "payload-ran", tmp_path / "planted.pt"
    planted.write_bytes(pickle.dumps({"x": Planted(marker)}))  # holds builtins' open, not this class
    pickle.loads(planted.read_bytes())  # the payload is live: loading it runs it
    assert marker.exists()
    marker.unlink()
    logs = tmp_path / "logs"
    result = run_cli(
        "+callbacks.x._target_=torch.load",
        f"+callbacks.x.f={planted}",
        "+callbacks.x.weights_only=false",
        f"paths.log_dir={logs}",
        timeout=300,
    )
    _assert_refused(result, "callbacks.x._target_", "torch.load")
    assert not marker.exists()
    assert not (logs / "runs").exists() or not any((logs / "runs").rglob("*")), "a run folder was left"


def test_shutil_copy_and_builtins_open_in_an_experiment_file_are_refused(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    configs = tmp_path / "config" / "experiment"
    configs.mkdir(parents=True)
    (configs / "evil.yaml").write_text(
        "# @package _global_\n"
        f"callbacks:\n  copy:\n    _target_: shutil.copy\n    src: /dev/null\n    dst: {victim}\n"
        f"  wipe:\n    _target_: builtins.open\n    file: {victim}\n    mode: w\n"
    )
    result = run_cli(
        "experiment=evil",
        f"hydra.searchpath=[file://{tmp_path / 'config'}]",
        f"paths.log_dir={tmp_path / 'logs'}",
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "is not an allowed target" in result.stderr and "callbacks.copy._target_=shutil.copy" in result.stderr
    assert victim.read_text() == "precious\n"
    assert not list((tmp_path / "logs").rglob("*.csv"))


def test_a_sweep_is_refused_before_any_trial(tmp_path):
    result = run_cli(
        "-m",
        "hydra/launcher=basic",
        "seed=1,2",
        "+callbacks.x._target_=builtins.exec",
        "+callbacks.x._args_=[1]",
        f"paths.log_dir={tmp_path}",
        timeout=300,
    )
    _assert_refused(result, "callbacks.x._target_", "builtins.exec")
    assert not (tmp_path / "multiruns").exists()


def test_a_registered_methods_class_is_trusted_without_allowed_targets(monkeypatch):
    """The registry's entry (class: my_methods.ProtoX) allows that class on every command; the rest
    of the package stays refused."""
    monkeypatch.setattr(registry, "trusted_targets", lambda: ["my_methods.ProtoX"])
    check_targets(OmegaConf.create({"model": {"method": {"_target_": "my_methods.ProtoX"}}}))
    with pytest.raises(ConfigError, match=r"model\.method\._target_=my_methods\.Other is not an allowed target"):
        check_targets(OmegaConf.create({"model": {"method": {"_target_": "my_methods.Other"}}}))
