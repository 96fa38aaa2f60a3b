"""CIDER and PALM: each loss term pinned by values computed by hand from the papers' equations
(docs/methods.md) on tiny tensors, the prototype updates on hand-made batches, the interface,
the two views, and no host synchronisation (meta device). The device guards, the no-sync check of
the training step and the one-graph check cover them through the registry
(tests/test_device_guard.py, tests/test_compile.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mchad import registry
from mchad.data.augment import BatchTransform, repeat_views
from mchad.models.cider import CIDER, CompLoss, DisLoss, ema_prototypes
from mchad.models.hypersphere import PrototypeMethod, SphereOutput
from mchad.models.palm import PALM, class_restricted, mle_loss, proto_contrastive_loss, sinkhorn

METHODS = {
    "cider": lambda: CIDER(3, 8, feat_dim=4),
    "palm": lambda: PALM(3, 8, feat_dim=4, n_prototypes=2, top_k=1),
}


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# --- CIDER: L_comp, L_dis ----------------------------------------------------------------
def test_compactness_loss_by_hand():
    # prototypes mu_0 = (1, 0), mu_1 = (0, 1); tau = 0.5; the outlier row (label -1) is ignored
    #   z_0 = (1, 0),     y = 0: logits (2, 0)     -> -log(e^2 / (e^2 + e^0)) = log(1 + e^-2) = 0.126928
    #   z_1 = (0.6, 0.8), y = 1: logits (1.2, 1.6) -> -log(e^1.6 / (e^1.2 + e^1.6)) = log(1 + e^-0.4) = 0.513015
    expected = (math.log1p(math.exp(-2)) + math.log1p(math.exp(-0.4))) / 2
    assert expected == pytest.approx(0.3199715, abs=1e-6)
    z = t([1.0, 0.0], [0.6, 0.8], [0.0, 1.0])
    loss = CompLoss(temperature=0.5)(z, t([1.0, 0.0], [0.0, 1.0]), torch.tensor([0, 1, -1]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # prototypes are normalised first: a longer prototype gives the same loss
    longer = CompLoss(temperature=0.5)(z, t([3.0, 0.0], [0.0, 2.0]), torch.tensor([0, 1, -1]))
    assert longer.item() == pytest.approx(expected, rel=1e-6)


def test_dispersion_loss_by_hand():
    # mu = (1, 0), (0, 1), (-1, 0); tau = 0.5; dot products mu0.mu1 = 0, mu0.mu2 = -1, mu1.mu2 = 0
    #   row 0: log((e^0 + e^-2) / 2) = log(0.567668) = -0.566219
    #   row 1: log((e^0 + e^0) / 2) = 0
    #   row 2: log((e^-2 + e^0) / 2) = -0.566219      mean = -0.377479
    row0 = math.log((1 + math.exp(-2)) / 2)
    expected = (2 * row0 + 0.0) / 3
    assert expected == pytest.approx(-0.377479, abs=1e-6)
    assert DisLoss(temperature=0.5)(t([1.0, 0.0], [0.0, 1.0], [-1.0, 0.0])).item() == pytest.approx(expected)
    # prototypes further apart -> smaller loss
    assert DisLoss(0.5)(t([1.0, 0.0], [-1.0, 0.0], [0.0, 1.0])) == DisLoss(0.5)(t([1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]))
    assert DisLoss(0.5)(t([1.0, 0.0], [0.0, 1.0])) < DisLoss(0.5)(t([1.0, 0.0], [0.6, 0.8]))


# --- CIDER: the EMA update -----------------------------------------------------------------
def sequential_update(prototypes, z, target, momentum):
    """The paper's Eq. 7 as the official DisLoss runs it: sample after sample."""
    p = prototypes.clone()
    for zj, yj in zip(z, target.tolist(), strict=True):
        if yj >= 0:
            p[yj] = F.normalize(momentum * p[yj] + (1 - momentum) * zj, dim=0)
    return p


def test_ema_update_one_sample_per_class_by_hand():
    # alpha = 0.5, mu_0 = (1, 0), mu_1 = (0, 1); z_a = (0, 1) of class 0, z_b = (0.6, 0.8) of class 1
    #   mu_0' = Normalize(0.5 (1, 0) + 0.5 (0, 1)) = (1, 1) / sqrt 2
    #   mu_1' = Normalize(0.5 (0, 1) + 0.5 (0.6, 0.8)) = Normalize(0.3, 0.9) = (0.316228, 0.948683)
    protos, z, y = t([1.0, 0.0], [0.0, 1.0]), t([0.0, 1.0], [0.6, 0.8]), torch.tensor([0, 1])
    updated = ema_prototypes(protos, z, y, 0.5)
    r = 1 / math.sqrt(2)
    assert torch.allclose(updated, t([r, r], [0.3 / math.sqrt(0.9), 0.9 / math.sqrt(0.9)]), atol=1e-6)
    assert torch.allclose(updated, sequential_update(protos, z, y, 0.5), atol=1e-7)


def test_ema_update_several_samples_of_a_class_by_hand():
    # class 0 gets z_a = (0, 1) then z_c = (-1, 0); class 1 none; an outlier (-1) does not count.
    # Batched (one normalisation): alpha^2 mu_0 + (1 - alpha)(alpha z_a + z_c)
    #   = 0.25 (1, 0) + 0.5 (0.5 (0, 1) + (-1, 0)) = (-0.25, 0.25) -> (-1, 1) / sqrt 2
    # Sequential (Eq. 7 after each sample): (1, 1)/sqrt 2, then Normalize(0.5 (1, 1)/sqrt 2 + 0.5 (-1, 0))
    #   = Normalize(-0.146447, 0.353553) = (-0.382683, 0.923880): the documented difference
    protos = t([1.0, 0.0], [0.0, 1.0])
    z, y = t([0.0, 1.0], [5.0, 5.0], [-1.0, 0.0]), torch.tensor([0, -1, 0])
    r = 1 / math.sqrt(2)
    updated = ema_prototypes(protos, z, y, 0.5)
    assert torch.allclose(updated, t([-r, r], [0.0, 1.0]), atol=1e-6)
    sequential = sequential_update(protos, z, y, 0.5)
    assert torch.allclose(sequential[0], t([-0.382683, 0.923880])[0], atol=1e-6)
    assert torch.equal(updated[1], protos[1])  # absent class: unchanged


def test_ema_update_starts_from_zero_and_carries_the_gradient():
    z = F.normalize(torch.randn(6, 3), dim=1).requires_grad_(True)
    y = torch.tensor([0, 0, 1, 1, 0, -1])
    updated = ema_prototypes(torch.zeros(3, 3), z, y, 0.95)
    # a zero prototype becomes the normalised weighted mean of its batch: alpha^(n - r) (1 - alpha) z_j
    w = torch.tensor([0.95**2, 0.95, 0, 0, 1.0]) * 0.05
    assert torch.allclose(updated[0], F.normalize(w @ z[:5].detach(), dim=0), atol=1e-6)
    assert updated[2].abs().sum() == 0  # never seen: stays zero
    DisLoss(0.1)(updated).backward()
    assert z.grad[:4].abs().sum() > 0 and z.grad[5].abs().sum() == 0  # the outlier gets no gradient


def test_cider_loss_weighs_updated_prototypes():
    method = CIDER(2, 4, feat_dim=2, temperature=0.5, momentum=0.5, weight_comp=2.0, weight_dis=3.0)
    method.prototypes.copy_(t([1.0, 0.0], [0.0, 1.0]))
    z, y = t([0.0, 1.0], [0.6, 0.8]), torch.tensor([0, 1])
    updated = ema_prototypes(method.prototypes, z, y, 0.5)
    terms = method.loss(SphereOutput(projection=z), y)
    comp, dis = CompLoss(0.5)(z, updated, y), DisLoss(0.5)(updated)
    assert terms["comp"].item() == pytest.approx(comp.item()) and terms["dis"].item() == pytest.approx(dis.item())
    assert terms["loss"].item() == pytest.approx(2 * comp.item() + 3 * dis.item())
    assert torch.allclose(method.prototypes, updated)  # training moved the buffer
    method.eval()
    before = method.prototypes.clone()
    method.loss(SphereOutput(projection=z), y)
    assert torch.equal(method.prototypes, before)  # evaluation does not


# --- PALM ------------------------------------------------------------------------------------
def test_sinkhorn_one_iteration_by_hand():
    # exp(S / eps) = [[2, 1], [1, 1]] (eps = 1, S = [[ln 2, 0], [0, 0]]); Q = that / 5
    #   prototypes' columns to 1/K = 1/2: col 0 (2, 1)/3/2 = (1/3, 1/6), col 1 (1, 1)/2/2 = (1/4, 1/4)
    #   samples' rows to 1/N = 1/2: row 0 (1/3, 1/4) / (7/12) / 2 = (2/7, 3/14),
    #                               row 1 (1/6, 1/4) / (5/12) / 2 = (1/5, 3/10)
    #   times N = 2: [[4/7, 3/7], [2/5, 3/5]]
    q = sinkhorn(t([math.log(2), 0.0], [0.0, 0.0]), epsilon=1.0, iterations=1)
    assert torch.allclose(q, t([4 / 7, 3 / 7], [2 / 5, 3 / 5]), atol=1e-6)
    # many iterations: rows sum to 1, every prototype gets N / K of the mass
    q = sinkhorn(torch.randn(6, 3), epsilon=0.5, iterations=200)
    assert torch.allclose(q.sum(dim=1), torch.ones(6), atol=1e-5)
    assert torch.allclose(q.sum(dim=0), torch.full((3,), 2.0), atol=1e-4)


def test_mle_loss_by_hand():
    # prototypes (class = index mod 2): p0 = (1, 0) c0, p1 = (0, 1) c1, p2 = (0.6, 0.8) c0, p3 = (-1, 0) c1
    # z = (0.8, 0.6) of class 0, tau = 1, assignment to (p0, p2) = (1, 3) -> normalised (0.25, 0.75)
    #   logits z.p = (0.8, 0.6, 0.96, -0.8); positive 0.25 * 0.8 + 0.75 * 0.96 = 0.92
    #   log(e^0.8 + e^0.6 + e^0.96 + e^-0.8) = log(7.108685) = 1.961318  -> loss 1.041318
    lse = math.log(math.exp(0.8) + math.exp(0.6) + math.exp(0.96) + math.exp(-0.8))
    assert lse - 0.92 == pytest.approx(1.041318, abs=1e-6)
    protos = t([1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0])
    z = t([0.8, 0.6], [0.0, 1.0])  # the second row is an outlier
    weights = t([1.0, 0.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0])
    loss = mle_loss(z, protos, weights, known=t(1.0, 0.0), temperature=1.0)
    assert loss.item() == pytest.approx(lse - 0.92, rel=1e-6)


def test_prototype_contrastive_loss_by_hand():
    # p0 = (1, 0) c0, p1 = (0, 1) c1, p2 = (0.6, 0.8) c0, p3 = (-1, 0) c1; tau' = 1
    # dots: p0p1 0, p0p2 0.6, p0p3 -1, p1p2 0.8, p1p3 0, p2p3 -0.6; per row log-sum-exp over the others
    # minus the mean over the same-class others:
    #   row 0: log(e^0 + e^0.6 + e^-1) - 0.6 = 0.560020     row 1: log(e^0 + e^0.8 + e^0) - 0 = 1.441146
    #   row 2: log(e^0.6 + e^0.8 + e^-0.6) - 0.6 = 0.925287  row 3: log(e^-1 + e^0 + e^-0.6) - 0 = 0.650602
    rows = [
        math.log(1 + math.exp(0.6) + math.exp(-1)) - 0.6,
        math.log(2 + math.exp(0.8)),
        math.log(math.exp(0.6) + math.exp(0.8) + math.exp(-0.6)) - 0.6,
        math.log(math.exp(-1) + 1 + math.exp(-0.6)),
    ]
    assert sum(rows) / 4 == pytest.approx(0.894264, abs=1e-6)
    protos = t([1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0])
    loss = proto_contrastive_loss(protos, torch.tensor([0, 1, 0, 1]), temperature=1.0)
    assert loss.item() == pytest.approx(sum(rows) / 4, rel=1e-6)


def test_palm_update_by_hand():
    # one prototype per class: a sample's assignment within its class is 1 whatever Sinkhorn says.
    # p0 = (1, 0), p1 = (0, 1), alpha = 0.5; class 0 gets (0, 1) and (0.6, 0.8), class 1 nothing
    #   update of p0 = their mean (0.3, 0.9); p0' = Normalize(0.5 (1, 0) + 0.5 (0.3, 0.9)) = Normalize(0.65, 0.45)
    #   p1 has no sample: Normalize(0.5 (0, 1)) = (0, 1)
    method = PALM(2, 4, feat_dim=2, n_prototypes=1, top_k=0, momentum=0.5).train()
    method.prototypes.copy_(t([1.0, 0.0], [0.0, 1.0]))
    method.loss(SphereOutput(projection=t([0.0, 1.0], [0.6, 0.8], [1.0, 0.0])), torch.tensor([0, 0, -1]))
    n = math.hypot(0.65, 0.45)
    assert torch.allclose(method.prototypes, t([0.65 / n, 0.45 / n], [0.0, 1.0]), atol=1e-6)


def test_palm_top_k_moves_only_the_chosen_prototypes():
    torch.manual_seed(0)
    method = PALM(2, 4, feat_dim=3, n_prototypes=3, top_k=1, momentum=0.5).train()
    z, y = F.normalize(torch.randn(8, 3), dim=1), torch.tensor([0, 1] * 4)
    mask = (y.unsqueeze(1) == method.classes.unsqueeze(0)).float()
    _, chosen = class_restricted(method.assign(z, method.prototypes), mask, 1, 3)
    assert torch.equal(chosen.sum(dim=1), torch.ones(8))  # one prototype each, of its own class
    assert torch.equal((chosen * (1 - mask)).sum(), torch.tensor(0.0))
    before = method.prototypes.clone()
    method.loss(SphereOutput(projection=z), y)
    moved = (method.prototypes - before).abs().sum(dim=1) > 0
    assert torch.equal(moved, chosen.sum(dim=0) > 0)


def test_palm_class_scores():
    # classes by index mod 2: p0 (1, 0) c0, p1 (0, 1) c1, p2 (-1, 0) c0, p3 (0, -1) c1; z = (0.6, 0.8)
    #   class 0: nearest p0, d = 2 - 2 * 0.6 = 0.8;  class 1: nearest p1, d = 2 - 2 * 0.8 = 0.4
    #   class logits (tau = 1): log(e^0.6 + e^-0.6), log(e^0.8 + e^-0.8)
    method = PALM(2, 4, feat_dim=2, n_prototypes=2, temperature=1.0)
    method.prototypes.copy_(t([1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]))
    distances, logits = method.class_scores(t([0.6, 0.8]))
    assert torch.allclose(distances, t([0.8, 0.4]), atol=1e-6)
    assert torch.allclose(logits, t([math.log(2 * math.cosh(0.6)), math.log(2 * math.cosh(0.8))]), atol=1e-6)


# --- both: interface, no host sync, views ----------------------------------------------------
@pytest.mark.parametrize("name", sorted(METHODS))
def test_interface(name):
    torch.manual_seed(0)
    method = METHODS[name]().train()
    f = torch.randn(8, 8, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, -1])
    out = method(f)
    assert out.projection.norm(dim=1).allclose(torch.ones(8))
    assert torch.allclose(method.logits_of(f), out.logits)  # before the loss moves the prototypes
    terms = method.loss(out, y)
    assert set(terms) == {*method.weights, "loss"} and torch.isfinite(terms["loss"])
    terms["loss"].backward()
    assert torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0
    assert method.predict(out).shape == (8,) and method.score_names[0] == "distance"
    scores = method.scores(out)
    assert set(scores) == set(method.score_names) and all(s.shape == (8,) for s in scores.values())
    assert method.features(out) is f and method.linear_head is None
    assert "prototypes" in method.state_dict()
    assert method.train_views == 2


@pytest.mark.parametrize("name", sorted(METHODS))
def test_losses_need_no_host_sync(name):
    """On the meta device there are no values: a loss that runs there has static shapes and no
    host synchronisation (see tests/test_losses.py)."""
    method = METHODS[name]().train().to("meta")
    f = torch.randn(10, 8, device="meta", requires_grad=True)
    terms = method.loss(method(f), torch.zeros(10, dtype=torch.long, device="meta"))
    terms["loss"].backward()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: CIDER(1, 4), "2 classes"),
        (lambda: CIDER(3, 4, momentum=1.0), "momentum"),
        (lambda: CIDER(3, 4, weight_comp=-1), "weight_comp"),
        (lambda: PALM(3, 4, temperature=0), "temperature"),
        (lambda: PALM(3, 4, n_prototypes=0), "n_prototypes"),
    ],
)
def test_invalid_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_two_views_differ_and_keep_their_labels():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3, -1])
    doubled, doubled_labels = repeat_views(images, labels, 2)
    assert torch.equal(doubled[:5], images) and torch.equal(doubled[5:], images)
    assert doubled_labels.tolist() == [0, 1, 2, 3, -1, 0, 1, 2, 3, -1]
    views = BatchTransform([0.5], [0.25], crop_padding=2)(doubled, augment=True)
    assert views.shape == (10, 1, 8, 8) and not torch.equal(views[:5], views[5:])  # each row its own draw
    assert repeat_views(images, labels, 1) == (images, labels)


@pytest.mark.parametrize("name", [m.key for m in registry.methods().values() if not m.outliers])
def test_the_datamodule_draws_the_methods_views(name, tmp_path):
    """build() hands the method's train_views (CIDER, PALM: 2; the others: 1) to the datamodule:
    a training batch of 64 becomes 64 x views rows (labels repeated), validation batches stay single."""
    from conftest import compose_config

    from mchad.runs.train import build

    cfg = compose_config([f"model={name}", f"dataset_dir={tmp_path / 'data'}"], output_dir=tmp_path / "run")
    datamodule, model = build(cfg)
    views = datamodule.train_views
    assert views == (2 if isinstance(model.method, PrototypeMethod) else 1)
    images, labels = next(iter(datamodule.train_dataloader()))
    datamodule.trainer = type("T", (), {"training": True})()
    x, y = datamodule.on_after_batch_transfer((images, labels), 0)
    assert x.shape[0] == y.shape[0] == views * len(labels) and x.dtype == torch.float32
    datamodule.trainer.training = False
    assert datamodule.on_after_batch_transfer((images, labels), 0)[0].shape[0] == len(labels)


def test_ddp_ranks_keep_the_same_prototypes(monkeypatch):
    """In DDP every rank stores the normalised mean of all ranks' updated prototypes (here the
    other rank's update is (0, 1) for a prototype this rank moved to (1, 0))."""
    import mchad.models.hypersphere as hypersphere

    other = t([0.0, 1.0], [0.0, 1.0])
    monkeypatch.setattr(hypersphere, "distributed_world", lambda: 2)
    monkeypatch.setattr(hypersphere, "all_reduce_sum_", lambda tensor: tensor.add_(other))
    method = CIDER(2, 4, feat_dim=2, momentum=0.0).train()
    method.loss(SphereOutput(projection=t([1.0, 0.0], [0.0, 1.0])), torch.tensor([0, 1]))
    r = 1 / math.sqrt(2)
    assert torch.allclose(method.prototypes, t([r, r], [0.0, 1.0]))
