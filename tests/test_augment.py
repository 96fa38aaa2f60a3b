"""The batched device transform against torchvision's per-image PIL pipeline on the same images."""

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from mchad.data.augment import BatchTransform, crop_flip

MEAN, STD = [0.4914, 0.4824, 0.4467], [0.2471, 0.2435, 0.2616]


def images(n: int = 64, seed: int = 0) -> torch.Tensor:
    """Structured uint8 images (gradients + noise), so crops and flips change them."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 200, 32).view(1, 1, 1, 32).expand(n, 3, 32, 32)
    return (ramp + torch.randint(0, 56, (n, 3, 32, 32), generator=g)).to(torch.uint8)


def pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def torchvision_fixed(image: torch.Tensor, dy: int, dx: int, flip: bool, padding: int = 4) -> torch.Tensor:
    """torchvision's RandomCrop(32, padding) + flip + ToTensor + Normalize at a given draw."""
    img = T.Pad(padding)(pil(image))
    img = img.crop((dx, dy, dx + 32, dy + 32))  # F.crop(img, top=dy, left=dx, 32, 32)
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return T.Normalize(MEAN, STD)(T.ToTensor()(img))


def test_exactly_torchvision_for_fixed_offset_and_flip():
    x = images(18)
    dy = torch.tensor([0, 8, 4, 1, 7, 3] * 3)
    dx = torch.tensor([8, 0, 4, 6, 2, 5] * 3)
    flips = torch.tensor([False, True, False, True, True, False] * 3)
    cropped = crop_flip(x, 4, True, offsets=(dy, dx), flips=flips)
    ours = BatchTransform(MEAN, STD)(cropped, augment=False)
    for i in range(len(x)):
        expected = torchvision_fixed(x[i], int(dy[i]), int(dx[i]), bool(flips[i]))
        assert torch.equal(ours[i], expected), i


def test_no_augmentation_equals_totensor_normalize():
    x = images(8)
    ours = BatchTransform(MEAN, STD, crop_padding=4, flip=True)(x, augment=False)
    expected = torch.stack([T.Normalize(MEAN, STD)(T.ToTensor()(pil(im))) for im in x])
    assert torch.equal(ours, expected)


def test_random_draws_match_torchvision_distribution():
    """Crop offsets uniform on 0..8 in both axes, flip rate 1/2, per image independently."""
    torch.manual_seed(0)
    n = 20000
    # a single bright pixel in the centre reveals each image's offset and flip
    x = torch.zeros(n, 1, 32, 32, dtype=torch.uint8)
    x[:, 0, 10, 5] = 255  # asymmetric column so that a flip is visible
    out = BatchTransform([0.0], [1.0], crop_padding=4, flip=True)(x, augment=True)
    hit = (out[:, 0] > 0.5).flatten(1).float().argmax(1)
    row, col = hit // 32, hit % 32
    dy = 10 + 4 - row  # output row = 10 + 4 - dy
    flipped = col > 15
    dx = torch.where(flipped, 31 - col, col)
    dx = 5 + 4 - dx
    assert ((dy >= 0) & (dy <= 8)).all() and ((dx >= 0) & (dx <= 8)).all()
    for d in (dy, dx):
        counts = torch.bincount(d, minlength=9).float()
        expected = n / 9
        chi2 = ((counts - expected) ** 2 / expected).sum().item()
        assert chi2 < 26.1, chi2  # 8 degrees of freedom, p = 0.001
    assert abs(flipped.float().mean().item() - 0.5) < 0.015
    # independence of the flip from the offset
    assert abs(flipped[dy < 4].float().mean().item() - flipped[dy >= 4].float().mean().item()) < 0.03


def test_output_statistics_match_torchvision_pipeline():
    """Per-channel mean and std of augmented outputs agree with the PIL pipeline's."""
    x = images(512, seed=1)
    torch.manual_seed(0)
    ours = torch.cat([BatchTransform(MEAN, STD, crop_padding=4, flip=True)(x, augment=True) for _ in range(4)])
    pipeline = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    torch.manual_seed(1)
    pil_images = [pil(im) for im in x]
    theirs = torch.stack([pipeline(im) for _ in range(4) for im in pil_images])
    for dims in ((0, 2, 3),):
        m1, m2 = ours.mean(dims), theirs.mean(dims)
        s1, s2 = ours.std(dims), theirs.std(dims)
        assert torch.allclose(m1, m2, atol=0.01), (m1, m2)
        assert torch.allclose(s1, s2, rtol=0.01), (s1, s2)
    # the fraction of zero-padded pixels (value -mean/std) matches too
    pad = (-torch.tensor(MEAN) / torch.tensor(STD)).view(1, 3, 1, 1)
    f1 = torch.isclose(ours, pad).float().mean().item()
    f2 = torch.isclose(theirs, pad).float().mean().item()
    assert abs(f1 - f2) < 0.01, (f1, f2)


def test_channels_last_and_dtype():
    x = images(4)
    out = BatchTransform(MEAN, STD, crop_padding=4, flip=True, channels_last=True)(x, augment=True)
    assert out.dtype == torch.float32 and out.shape == (4, 3, 32, 32)
    assert out.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(TypeError):
        BatchTransform(MEAN, STD)(x.float())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_same_result_on_gpu():
    x = images(16)
    dy, dx = torch.randint(0, 9, (16,)), torch.randint(0, 9, (16,))
    flips = torch.rand(16) < 0.5
    t = BatchTransform(MEAN, STD)
    cpu = t(crop_flip(x, 4, True, (dy, dx), flips))
    gpu = t(crop_flip(x.cuda(), 4, True, (dy.cuda(), dx.cuda()), flips.cuda())).cpu()
    assert torch.allclose(cpu, gpu, atol=1e-6)
