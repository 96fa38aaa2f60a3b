"""Loss terms: hand-computed values from PAPER.md's equations, equality with pytorch-ood's
losses, and no data-dependent shapes or host synchronisation (they run on the meta device)."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_ood.loss import CACLoss, CenterLoss, IILoss, MCHADLoss
from pytorch_ood.loss.crossentropy import cross_entropy
from pytorch_ood.loss.mchad import CenterRegularizationLoss

from mchad.models import losses
from mchad.models.methods import CAC, II, MCHAD, Center, MethodOutput, Softmax

# a batch of 3: two known samples (labels 0, 1) and one outlier (-1); 2 classes
D = torch.tensor([[1.0, 4.0], [9.0, 0.25], [1.0, 3.0]])
Y = torch.tensor([0, 1, -1])


# --- hand-computed values ----------------------------------------------------------------
def test_pull_term_both_readings():
    # published, r = 0.5: max(0, d_y - r) on the known rows' target entries
    #   row 0 (y=0): 1 - 0.5 = 0.5;  row 1 (y=1): max(0, 0.25 - 0.5) = 0
    #   mean over the 2 x 2 known matrix (non-target entries 0): 0.5 / 4 = 0.125
    assert losses.center_pull(D, Y, 0.5).item() == pytest.approx(0.125, abs=1e-9)
    # paper, r = 0.5 (Euclidean): max(0, d_y - r^2) = 1 - 0.25 = 0.75 and max(0, 0.25 - 0.25) = 0
    #   -> 0.75 / 4 = 0.1875
    r2 = losses.pull_radius(0.5, "paper")
    assert r2 == 0.25
    assert losses.center_pull(D, Y, r2).item() == pytest.approx(0.1875, abs=1e-9)


def test_separation_term():
    # CE(-d, y) = log(1 + sum_{i!=y} exp(d_y - d_i)), mean over known rows:
    #   row 0: log(1 + e^(1-4)) = log(1 + e^-3) = 0.0485873
    #   row 1: log(1 + e^(0.25-9)) = log(1 + e^-8.75) = 0.0001585
    #   mean = 0.0243729
    expected = (math.log1p(math.exp(-3)) + math.log1p(math.exp(-8.75))) / 2
    assert expected == pytest.approx(0.0243729, abs=1e-6)
    assert losses.softmin_nll(D, Y).item() == pytest.approx(expected, rel=1e-5)


def test_push_term_both_readings():
    # only the outlier row d = (1, 3) counts (sum reduction)
    # published, m = 2: sum_i max(0, m^2 - d_i^2) = max(0, 4 - 1) + max(0, 4 - 9) = 3
    assert losses.OutlierPush(margin=2.0, semantics="published")(D, Y).item() == pytest.approx(3.0)
    # paper, r = 0.5, m = 2: sum_i max(0, (r + m)^2 - d_i) = (6.25 - 1) + (6.25 - 3) = 8.5
    assert losses.OutlierPush(margin=2.0, radius=0.5, semantics="paper")(D, Y).item() == pytest.approx(8.5)
    # no outliers -> 0
    assert losses.OutlierPush(margin=2.0)(D[:2], Y[:2]).item() == 0.0


@pytest.mark.parametrize(
    "semantics, center, oe, rows",
    # published: the means run over all 3 rows (the outlier counts as 0): pull 0.5 / (3 x 2)
    [("published", 0.5 / 6, 3.0, 3), ("paper", 0.1875, 8.5, 2)],
)
def test_mchad_loss_weighs_the_three_terms(semantics, center, oe, rows):
    method = MCHAD(2, 2, radius=0.5, margin=2.0, weight_center=0.5, weight_ce=1.5, weight_oe=0.1, semantics=semantics)
    terms = method.loss(MethodOutput(distances=D), Y)
    nll = (math.log1p(math.exp(-3)) + math.log1p(math.exp(-8.75))) / rows
    assert terms["center"].item() == pytest.approx(center, rel=1e-6)
    assert terms["nll"].item() == pytest.approx(nll, rel=1e-5)
    assert terms["oe"].item() == pytest.approx(oe)
    # 0.5 * center + 1.5 * nll + 0.1 * oe
    assert terms["loss"].item() == pytest.approx(0.5 * center + 1.5 * nll + 0.1 * oe, rel=1e-6)


def test_center_method_loss():
    # Center: weight_ce * CE(logits) + weight_center * L_center (r = 0) + weight_oe * L_reg
    # logits (known rows): row 0 (2, 0), y=0: log(1 + e^-2) = 0.126928; row 1 (0, 0), y=1: log 2 = 0.693147
    # L_center (r = 0): (1 + 0.25) / 4 = 0.3125;  L_reg (paper, r = 0, m = 2): (4 - 1) + (4 - 3) = 4
    method = Center(2, 2, margin=2.0, weight_center=0.5, weight_ce=1.5, weight_oe=0.1, semantics="paper")
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0], [5.0, -5.0]])
    terms = method.loss(MethodOutput(distances=D, logits=logits), Y)
    nll = (math.log1p(math.exp(-2)) + math.log(2)) / 2
    assert terms["nll"].item() == pytest.approx(nll, rel=1e-6)
    assert terms["center"].item() == pytest.approx(0.3125, abs=1e-9)
    assert terms["oe"].item() == pytest.approx(4.0)
    assert terms["loss"].item() == pytest.approx(1.5 * nll + 0.5 * 0.3125 + 0.1 * 4.0, rel=1e-6)


def test_cac_loss_terms():
    # 3 classes, d = (1, 2, 5), y = 0:
    #   anchor  d_y = 1
    #   tuplet  log(1 + e^(1-2) + e^(1-5)) = log(1 + 0.367879 + 0.018316) = log(1.386195) = 0.326563
    d = torch.tensor([[1.0, 2.0, 5.0]])
    y = torch.tensor([0])
    assert losses.anchor_pull(d, y).item() == pytest.approx(1.0)
    assert losses.tuplet(d, y).item() == pytest.approx(0.326563, abs=1e-6)
    method = CAC(3, 3, magnitude=2.0, margin=1.0, weight_center=2.0, weight_ce=1.5, weight_oe=0.1, semantics="paper")
    terms = method.loss(MethodOutput(distances=d), y)
    # the published G-CAC weighting: weight_ce * (weight_center * anchor + tuplet) = 1.5 * (2 * 1 + tuplet);
    # no outliers -> L_reg = 0
    assert method.weights == {"anchor": 3.0, "tuplet": 1.5, "oe": 0.1}
    assert terms["oe"].item() == 0.0
    assert terms["loss"].item() == pytest.approx(1.5 * (2.0 * 1.0 + 0.326563), abs=1e-5)


def test_ii_terms():
    # z = (0,0), (2,0) of class 0 and (0,3), (0,5) of class 1:
    #   batch means mu_0 = (1, 0), mu_1 = (0, 4)
    #   spread = mean ||z - mu_y||^2 = (1 + 1 + 1 + 1) / 4 = 1
    #   separation = ||mu_0 - mu_1||^2 = 1 + 16 = 17;  loss = 1 - 100 * 17 = -1699
    z = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 3.0], [0.0, 5.0]])
    y = torch.tensor([0, 0, 1, 1])
    means, present = losses.batch_class_means(z, y, 3)
    assert means.tolist() == [[1.0, 0.0], [0.0, 4.0], [0.0, 0.0]]
    assert present.tolist() == [1.0, 1.0, 0.0]  # class 2 absent: not part of the separation
    terms = losses.ii_terms(z, y, means, present)
    assert terms["spread"].item() == pytest.approx(1.0)
    assert terms["separation"].item() == pytest.approx(17.0)
    lib = IILoss(3, 2, alpha=100.0)
    assert lib(z, y).item() == pytest.approx(1.0 - 100 * 17.0)


# --- equality with pytorch-ood -----------------------------------------------------------
def random_batch(seed: int, n: int = 12, c: int = 4, outliers: int = 4):
    g = torch.Generator().manual_seed(seed)
    d = torch.rand(n, c, generator=g) * 6
    y = torch.randint(0, c, (n,), generator=g)
    y[:outliers] = -1
    return d, y


@pytest.mark.parametrize("outliers", [0, 4, 12])
@pytest.mark.filterwarnings("ignore")
def test_equal_to_pytorch_ood(outliers):
    d, y = random_batch(outliers, outliers=outliers)
    known = y >= 0
    lib_center = CenterLoss(4, 3, radius=0.7)
    assert torch.allclose(losses.center_pull(d, y, 0.7), lib_center(d, y), atol=1e-7)
    assert torch.allclose(losses.softmin_nll(d, y), cross_entropy(-d, y), atol=1e-7)
    assert torch.allclose(losses.cross_entropy_known(d, y), cross_entropy(d, y), atol=1e-7)
    push = CenterRegularizationLoss(margin=2.5, reduction="sum")
    assert torch.allclose(losses.OutlierPush(2.5)(d, y), push(d, y), atol=1e-6)
    # the whole MCHAD loss (published reading) = pytorch-ood 0.4's MCHADLoss, whose means run over
    # the known rows only: with outliers, the published centre and CE terms are n_known / n of them
    lib = MCHADLoss(4, 3, radius=0.7, margin=2.5, weight_center=0.5, weight_nll=1.5, weight_oe=0.01)
    ours = MCHAD(4, 3, radius=0.7, margin=2.5, weight_center=0.5, weight_ce=1.5, weight_oe=0.01)
    terms = ours.loss(MethodOutput(distances=d), y)
    share = known.sum().item() / len(y)
    if known.any():
        assert torch.allclose(terms["center"], lib_center(d, y) * share, atol=1e-6)
        assert torch.allclose(terms["nll"], cross_entropy(-d, y) * share, atol=1e-6)
    if outliers == 0:
        assert torch.allclose(terms["loss"], lib(d, y), atol=1e-6)
    # CAC: anchor term always; the tuplet term where the library is right (label C-1, see losses.tuplet)
    cac = CACLoss(4, magnitude=2.0, alpha=2.0)
    last = torch.where(known, torch.full_like(y, 3), y)
    expected = 2.0 * losses.anchor_pull(d, last) + losses.tuplet(d, last)
    assert torch.allclose(expected, cac(d, last), atol=1e-6)


def test_pytorch_ood_cac_tuplet_differs_below_the_last_class():
    """pytorch-ood 0.4 compares d_y with classes 0..C-2 whatever the label; ours excludes y."""
    d = torch.tensor([[1.0, 2.0, 5.0]])
    lib = CACLoss(3, alpha=0.0)
    assert lib(d, torch.tensor([0])).item() == pytest.approx(math.log(1 + 1 + math.exp(-1)), abs=1e-5)
    assert losses.tuplet(d, torch.tensor([0])).item() == pytest.approx(
        math.log(1 + math.exp(-1) + math.exp(-4)), abs=1e-6
    )


@pytest.mark.filterwarnings("ignore")
def test_ii_equal_to_pytorch_ood_over_batches():
    torch.manual_seed(0)
    lib = IILoss(4, 3, alpha=100.0)
    ours = II(4, 3, weight_sep=100.0)
    for step in range(4):
        z = torch.randn(16, 3)
        y = torch.randint(0, 3, (16,))  # class 3 never present
        y[:3] = -1
        expected = lib(z, y)
        got = ours.loss(MethodOutput(embedding=z), y)["loss"]
        assert torch.allclose(got, expected, rtol=1e-5), step
        assert torch.allclose(ours.running.centers, lib.running_centers.centers, atol=1e-6)
    lib.eval(), ours.eval()
    z, y = torch.randn(16, 3), torch.randint(0, 3, (16,))
    assert torch.allclose(ours.loss(MethodOutput(embedding=z), y)["loss"], lib(z, y), rtol=1e-5)
    # a new epoch starts from fresh running centres
    ours.on_train_epoch_start()
    assert ours.running.centers.abs().sum().item() == 0.0


# --- no host synchronisation -------------------------------------------------------------
METHODS = {
    "mchad": lambda: MCHAD(4, 3, margin=2.0, weight_oe=0.1),
    "mchad-paper": lambda: MCHAD(4, 3, radius=1.0, margin=2.0, weight_oe=0.1, semantics="paper"),
    "center": lambda: Center(4, 3, margin=2.0, weight_oe=0.1),
    "cac": lambda: CAC(4, 4, margin=1.0, weight_oe=0.1),
    "ii": lambda: II(4, 3),
    "softmax": lambda: Softmax(4, 3),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_losses_need_no_host_sync(name):
    """On the meta device there are no values: boolean-mask indexing, ``.any()`` in an ``if``
    or ``.item()`` raise there, so a loss that runs has static shapes and no host sync."""
    method = METHODS[name]().train().to("meta")
    dim = 4 if name == "cac" else 3
    z = torch.randn(10, dim, device="meta", requires_grad=True)
    y = torch.zeros(10, dtype=torch.long, device="meta")
    terms = method.loss(method(z), y)
    assert terms["loss"].shape == ()
    terms["loss"].backward()


def test_the_meta_device_check_can_fail():
    """The library's CenterLoss drops outliers by boolean indexing: it cannot run on meta."""
    d = torch.rand(10, 4, device="meta")
    y = torch.zeros(10, dtype=torch.long, device="meta")
    with pytest.raises((RuntimeError, NotImplementedError)):
        CenterLoss(4, 3).to("meta")(d, y)
