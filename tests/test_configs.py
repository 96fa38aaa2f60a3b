"""Every config composes; the published command-line habits keep working."""

import pytest
from conftest import ALL_EXPERIMENTS, CONFIG_DIR, compose_config
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mchad.runs.train import trainer_kwargs


def resolve(cfg) -> dict:
    """The job's config, fully resolved (the hydra node is only complete inside a run)."""
    return {
        k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
        for k in cfg
        if k != "hydra"
    }


def test_default_config_is_the_quickstart(tmp_path):
    cfg = compose_config(output_dir=tmp_path)
    assert cfg.datamodule.name == "Digits"
    assert cfg.model.name == "MCHAD"
    assert cfg.model.backbone._target_.endswith("ConvNet")
    assert set(cfg.datamodule.test_cases) == {"Digits6-9", "GaussianNoise", "UniformNoise"}
    resolve(cfg)  # every interpolation resolves


@pytest.mark.parametrize("experiment", ALL_EXPERIMENTS)
def test_experiment_composes_and_resolves(experiment, tmp_path):
    cfg = compose_config([f"experiment={experiment}"], output_dir=tmp_path)
    resolved = resolve(cfg)
    assert resolved["name"] == experiment
    assert resolved["model"]["backbone"]["in_channels"] == len(resolved["datamodule"]["mean"])


def test_cifar10_mchad_has_the_published_hyperparameters(tmp_path):
    cfg = compose_config(["experiment=cifar10-mchad"], output_dir=tmp_path)
    assert cfg.model.backbone._target_.endswith("WideResNetBackbone")
    assert (cfg.model.backbone.depth, cfg.model.backbone.widen_factor, cfg.model.backbone.drop_rate) == (40, 2, 0.3)
    assert cfg.model.n_embedding == 16 and cfg.model.margin == 4 and cfg.model.radius == 0
    assert (cfg.model.weight_center, cfg.model.weight_ce, cfg.model.weight_oe) == (0.5, 1.0, 0.0)
    assert (cfg.model.optimizer.lr, cfg.model.optimizer.weight_decay) == (1e-3, 5e-5)
    assert cfg.trainer.max_epochs == 10 and cfg.trainer.limit_train_batches == 392
    assert cfg.trainer.limit_val_batches == 40
    assert cfg.datamodule.batch_size == 128
    assert list(cfg.datamodule.mean) == [0.4914, 0.4824, 0.4467]
    assert sorted(cfg.datamodule.test_cases) == sorted(
        [
            "Textures",
            "TinyImageNetCrop",
            "TinyImageNetResize",
            "LSUNCrop",
            "LSUNResize",
            "GaussianNoise",
            "UniformNoise",
        ]
    )


@pytest.mark.parametrize(
    "gpus, expected",
    [(None, ("auto", 1)), (1, ("gpu", 1)), (2, ("gpu", 2)), (0, ("cpu", 1))],
)
def test_published_trainer_gpus_maps_to_accelerator_and_devices(gpus, expected, tmp_path):
    overrides = [] if gpus is None else [f"trainer.gpus={gpus}"]
    kwargs = trainer_kwargs(compose_config(overrides, output_dir=tmp_path).trainer)
    assert "gpus" not in kwargs
    assert (kwargs.accelerator, kwargs.devices) == expected


def test_dataset_dir_override_reaches_the_datamodule(tmp_path):
    cfg = compose_config([f"dataset_dir={tmp_path}/datasets"], output_dir=tmp_path)
    assert instantiate(cfg.datamodule).dataset_dir == tmp_path / "datasets"


@pytest.mark.parametrize(
    "overrides",
    [
        [
            *("experiment=svhn-mchad", "model.margin=2", "~callbacks.model_checkpoint", "++trainer.fast_dev_run=true"),
            *("~logger", "+model.extra={a: 1}", "hydra.job.config.override_dirname.kv_sep=:", "model/backbone=convnet"),
        ],
        ["experiment=svhn-mchad", "model.no_such_key=1"],
        ["experiment=svhn-mchad", "+seed=2"],
        ["experiment=svhn-mchad", "~callbacks.no_such_callback"],
    ],
)
def test_the_tests_compose_as_hydra_does(overrides):
    """conftest composes the config groups' choices once and applies the value overrides on
    top: the config, its hydra node and any error are Hydra's own."""
    expected = _check_composes_as_hydra(overrides)
    assert isinstance(expected, dict) == ("no_such" not in " ".join(overrides) and "+seed=2" not in overrides)


def test_the_tests_compose_with_a_searchpath_as_hydra_does(tmp_path):
    """hydra.searchpath, a value, says where config groups are found: composed with the groups."""
    (tmp_path / "testmodules").mkdir()
    (tmp_path / "testmodules" / "mine.yaml").write_text((CONFIG_DIR / "testmodules" / "noise.yaml").read_text())
    assert isinstance(
        _check_composes_as_hydra([f"hydra.searchpath=[file://{tmp_path}]", "testmodules=mine", "seed=2"]), dict
    )


def _check_composes_as_hydra(overrides: list[str]) -> object:
    from conftest import _compose, compose_with_hydra

    def outcome(compose) -> object:
        try:
            return OmegaConf.to_container(compose(overrides), resolve=False)
        except Exception as error:  # noqa: BLE001 - the error is what is compared
            return f"{type(error).__name__}: {error}"

    expected = outcome(compose_with_hydra)
    assert outcome(_compose) == expected
    return expected
