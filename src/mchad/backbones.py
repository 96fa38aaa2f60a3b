"""Backbones: every one maps images ``B x C x H x W`` to embeddings ``B x n_embedding``.

One interface for all (as in timm): ``forward(x)`` returns the embedding and the attribute
``n_embedding`` says its width, so a method can be put on top of any backbone.
"""

import torch
from pytorch_ood.model import WideResNet
from torch import Tensor, nn


class WideResNetBackbone(nn.Module):
    """pytorch-ood's WideResNet (WRN-40-2 by default) whose last layer outputs the embedding."""

    def __init__(
        self,
        n_embedding: int,
        depth: int = 40,
        widen_factor: int = 2,
        drop_rate: float = 0.3,
        in_channels: int = 3,
    ):
        super().__init__()
        self.n_embedding = n_embedding
        self.net = WideResNet(
            num_classes=n_embedding,
            depth=depth,
            widen_factor=widen_factor,
            drop_rate=drop_rate,
            in_channels=in_channels,
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ConvNet(nn.Module):
    """A small VGG-style network for small images and CPU runs (any input size >= 4 x 4)."""

    def __init__(self, n_embedding: int, in_channels: int = 3, width: int = 32, drop_rate: float = 0.0):
        super().__init__()
        self.n_embedding = n_embedding

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, width),
            *block(width, width),
            nn.MaxPool2d(2),
            *block(width, 2 * width),
            *block(2 * width, 2 * width),
            nn.MaxPool2d(2),
            *block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(drop_rate),
        )
        self.fc = nn.Linear(4 * width, n_embedding)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


@torch.no_grad()
def output_width(backbone: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Width of the backbone's output for one input of ``input_shape`` (C, H, W)."""
    was_training = backbone.training
    backbone.eval()
    try:
        return backbone(torch.zeros(1, *input_shape)).shape[1]
    finally:
        backbone.train(was_training)
