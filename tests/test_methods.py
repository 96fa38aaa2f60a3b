"""Methods through their interface: outputs, scores (sign included), outliers, centres as
parameters, and the pretrained start of the WideResNet backbone."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config
from hydra.utils import instantiate
from pytorch_ood.loss import CACLoss

from mchad import registry
from mchad.errors import ConfigError
from mchad.models.backbones import ConvNet, WideResNetBackbone, load_pretrained
from mchad.models.methods import CAC, II, MCHAD, Center, Softmax
from mchad.models.settings import check_model_keys, unread_model_keys
from mchad.targets import allowed_patterns, is_allowed

C, D = 3, 4
METHODS = {
    "MCHAD": lambda: MCHAD(C, D, margin=3.0, weight_oe=0.1),
    "G-MCHAD": lambda: MCHAD(C, D, margin=3.0, weight_center=1.0, weight_ce=1.5, weight_oe=0.1),
    "Center": lambda: Center(C, D),
    "G-Center": lambda: Center(C, D, margin=3.0, weight_center=1.0, weight_ce=1.5, weight_oe=0.1),
    "CAC": lambda: CAC(C, C, magnitude=2.0, weight_center=2.0),
    # published CAC distances are ||.||^4 (16 at the origin): a margin of 20 reaches them
    "G-CAC": lambda: CAC(C, C, magnitude=2.0, margin=20.0, weight_center=2.0, weight_ce=1.5, weight_oe=0.1),
    "II": lambda: II(C, D),
    "Softmax": lambda: Softmax(C, D),
}
HEADLINE = {"Softmax": "msp"}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_interface(name):
    torch.manual_seed(0)
    method = METHODS[name]()
    dim = C if "CAC" in name else D
    z = torch.randn(8, dim, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1, 2, -1, -1])
    out = method(z)
    terms = method.loss(out, y)
    assert terms["loss"].shape == () and torch.isfinite(terms["loss"])
    assert set(terms) > {"loss"}
    terms["loss"].backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    assert method.predict(out).shape == (8,)
    scores = method.scores(out)
    assert set(scores) == set(method.score_names)
    assert method.score_names[0] == HEADLINE.get(name, "distance")
    if name != "Softmax":
        assert "msp" in method.score_names
    if "CAC" in name:
        assert "cac" in method.score_names
    for score in scores.values():
        assert score.shape == (8,) and torch.isfinite(score).all()


@pytest.mark.parametrize("name", ["G-MCHAD", "G-Center", "G-CAC"])
def test_g_variants_push_outliers_only(name):
    method = METHODS[name]()
    dim = C if "CAC" in name else D
    z = torch.zeros(4, dim)  # close to every centre: inside the margin
    out = method(z)
    with_outliers = method.loss(out, torch.tensor([0, 1, -1, -1]))
    without = method.loss(out, torch.tensor([0, 1, 2, 0]))
    assert with_outliers["oe"].item() > 0
    assert without["oe"].item() == 0.0
    # the push moves the outliers' embeddings: a gradient reaches them
    z = z.clone().requires_grad_(True)
    method.loss(method(z), torch.tensor([0, 1, -1, -1]))["oe"].backward()
    assert z.grad[2:].abs().sum() > 0 and z.grad[:2].abs().sum() == 0


@pytest.mark.parametrize("semantics, share", [("paper", 1.0), ("published", 0.5)])
def test_outliers_change_the_id_terms_only_by_the_row_count(semantics, share):
    """paper: the ID terms ignore outliers; published: they are means over all rows (3 of 6 known)."""
    method = MCHAD(C, D, margin=3.0, weight_oe=0.1, semantics=semantics)
    z = torch.randn(6, D)
    y = torch.tensor([0, 1, 2, -1, -1, -1])
    full = method.loss(method(z), y)
    known = method.loss(method(z[:3]), y[:3])
    for term in ("center", "nll"):
        assert torch.allclose(full[term], known[term] * share)


def test_distance_score_and_prediction():
    method = MCHAD(2, 2)
    with torch.no_grad():
        method.centers.copy_(torch.tensor([[0.0, 0.0], [4.0, 0.0]]))
    out = method(torch.tensor([[1.0, 0.0], [4.0, 3.0]]))
    # squared distances: (1, 9) and (25, 9)
    assert out.distances.tolist() == [[1.0, 9.0], [25.0, 9.0]]
    assert method.predict(out).tolist() == [0, 1]
    assert method.scores(out)["distance"].tolist() == [1.0, 9.0]


def test_cac_score_larger_means_more_anomalous():
    """gamma = d * (1 - softmin(d)); CAC's rejection score is min_c gamma_c (the CAC code)."""
    method = CAC(3, 3, magnitude=2.0, semantics="paper")  # anchors 2 * e_c, squared distances
    z = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [10.0, 10.0, 10.0]])  # at anchor 0, origin, far away
    out = method(z)
    cac = method.scores(out)["cac"]
    # at its anchor: d = (0, 8, 8) -> gamma_0 = 0;  origin: d = (4, 4, 4) -> 4 * (1 - 1/3) = 2.667
    assert cac[0].item() == pytest.approx(0.0, abs=1e-3)
    assert cac[1].item() == pytest.approx(8 / 3, rel=1e-5)
    assert cac[0] < cac[1] < cac[2]
    assert method.scores(out)["distance"].argsort().tolist() == [0, 1, 2]
    # pytorch-ood's CACLoss.score is -max_c gamma_c: it ranks the far-away input as the most normal
    library = CACLoss.score(out.distances)
    assert library[2] < library[1]


def test_msp_sign():
    method = Softmax(3, 3)
    with torch.no_grad():
        method.head.weight.copy_(torch.eye(3))
        method.head.bias.zero_()
    scores = method.scores(method(torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0]])))["msp"]
    assert scores[0] < scores[1]  # confident < uniform (-1/3)
    assert scores[1].item() == pytest.approx(-1 / 3)


def test_centres_are_parameters_cac_anchors_are_fixed():
    model = torch.nn.ModuleDict({"m": MCHAD(C, D), "c": Center(C, D), "a": CAC(C, C, magnitude=2.0)})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "m.class_centers._params" in trainable
    assert "c.class_centers._params" in trainable and "c.head.weight" in trainable
    assert "a.class_centers._params" not in trainable
    assert torch.equal(model["a"].centers, 2.0 * torch.eye(C))
    assert "a.class_centers._params" in model.state_dict()  # saved in checkpoints


def test_ii_running_centres():
    torch.manual_seed(0)
    method = II(C, D).train()
    z = torch.randn(9, D)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    method.loss(method(z), y)
    assert method.centers.abs().sum() > 0
    state = method.state_dict()
    assert "running.running_centers" in state and "norm.running_mean" in state
    method.on_train_epoch_start()
    assert method.centers.abs().sum() == 0
    # in evaluation the centres stay as they are
    method.loss(method(z), y)
    before = method.centers.clone()
    method.eval()
    method.loss(method(z), y)
    assert torch.equal(before, method.centers)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: CAC(10, 16), "n_embedding = n_classes"),
        (lambda: MCHAD(3, 4, weight_oe=-1), "weight_oe"),
        (lambda: MCHAD(3, 4, semantics="other"), "semantics"),
        (lambda: II(3, 4, weight_sep=-1), "weight_sep"),
    ],
)
def test_invalid_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# --- pretrained start --------------------------------------------------------------------
def small_wrn(n_embedding: int) -> WideResNetBackbone:
    return WideResNetBackbone(n_embedding, depth=10, widen_factor=1, drop_rate=0.0)


def hendrycks_checkpoint(path, nested: bool = False):
    """A checkpoint in Hendrycks' format: a WRN with 1000 outputs saved from DataParallel."""
    source = small_wrn(1000).net
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    torch.save({"state_dict": state} if nested else state, path)
    return source


@pytest.mark.parametrize("nested", [False, True])
def test_pretrained_checkpoint_loads_all_but_fc(tmp_path, nested):
    torch.manual_seed(0)
    source = hendrycks_checkpoint(tmp_path / "wrn.pt", nested)
    backbone = small_wrn(16)
    report = load_pretrained(backbone, str(tmp_path / "wrn.pt"))
    assert report["dropped"] == ["fc.weight", "fc.bias"]
    assert report["unexpected"] == []
    own = backbone.net.state_dict()
    for key, value in source.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(own[key], value), key
    assert own["fc.weight"].shape == (16, 64)


def test_pretrained_checkpoint_errors(tmp_path):
    hendrycks_checkpoint(tmp_path / "wrn.pt")
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="not a readable PyTorch checkpoint") as error:
        load_pretrained(small_wrn(16), str(junk))
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="does not match the backbone"):
        load_pretrained(ConvNet(16), str(tmp_path / "wrn.pt"))
    with pytest.raises(ConfigError, match="does not match the backbone"):
        load_pretrained(WideResNetBackbone(16, depth=16, widen_factor=1), str(tmp_path / "wrn.pt"))
    torch.save({"epoch": 3}, tmp_path / "nostate.pt")
    with pytest.raises(ConfigError, match="holds no state dict"):
        load_pretrained(small_wrn(16), str(tmp_path / "nostate.pt"))
    with pytest.raises(ConfigError, match="neither a file nor a pytorch-ood model name"):
        load_pretrained(small_wrn(16), str(tmp_path / "missing.pt"))


def test_pretrained_registry_name_offline(monkeypatch, tmp_path):
    """A registry name is downloaded by pytorch-ood; without internet: one line, what to do."""
    import pytorch_ood.model.registry as registry

    def offline(*args, **kwargs):
        raise RuntimeError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(registry, "load_state_dict_from_url", offline)
    with pytest.raises(ConfigError, match="could not download the pytorch-ood model") as error:
        load_pretrained(small_wrn(16), "wrn-40-2/imagenet32-nocifar/crossentropy")
    message = str(error.value)
    assert "\n" not in message and "imagenet_wrn_baseline_epoch_99.pt" in message


# ----------------------------------------------------------------------------- the registry's entries


@pytest.mark.parametrize("key", registry.keys())
def test_registry_entry_matches_its_model_config_and_class(key):
    """Each entry names its model config's class, results.csv name and headline score."""
    entry = registry.methods()[key]
    cfg = compose_config([f"model={entry.model}", *(["datamodule/outliers=photos"] if entry.outliers else [])])
    assert cfg.model.method._target_ == entry.cls
    assert cfg.model.name == entry.name
    method = instantiate(cfg.model.method)
    assert type(method).__module__ + "." + type(method).__qualname__ == entry.cls
    assert method.score_names[0] == entry.score
    assert (cfg.model.get("weight_oe") or 0) > 0 if entry.outliers else not cfg.model.get("weight_oe")
    assert is_allowed(entry.cls, allowed_patterns())  # trusted without allowed_targets=


@pytest.mark.parametrize("experiment", [*registry.experiments("paper"), *registry.experiments("openood")])
def test_every_model_setting_of_an_experiment_is_read(experiment):
    assert unread_model_keys(compose_config([f"experiment={experiment}"])) == []


def test_a_model_setting_that_nothing_reads_is_refused():
    """Softmax's method takes no margin: +model.margin=7 would train the same model, so it is refused."""
    with pytest.raises(ConfigError, match=r"^model\.margin=7 is read by nothing: Softmax's config passes no"):
        check_model_keys(compose_config(["experiment=cifar10-softmax", "+model.margin=7"]))
    with pytest.raises(ConfigError, match=r"model\.margin=7 is read by nothing.*\(and model\.zeta\)$"):
        check_model_keys(compose_config(["model=softmax", "+model.margin=7", "+model.zeta=1"]))
    check_model_keys(compose_config(["model=mchad", "model.margin=7"]))  # MCHAD reads it
