"""Backbones: every one maps images ``B x C x H x W`` to embeddings ``B x n_embedding``.

One interface for all (as in timm): ``forward(x)`` returns the embedding and the attribute
``n_embedding`` says its width, so a method can be put on top of any backbone.
"""

import logging

import torch
from pytorch_ood.model import WideResNet
from torch import Tensor, nn

log = logging.getLogger(__name__)


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


class ResNet18_32x32(nn.Module):  # noqa: N801 - OpenOOD's name
    """OpenOOD v1.5's CIFAR backbone ``ResNet18_32x32``: ResNet-18 (basic blocks 2-2-2-2, 64 to
    512 channels) with a 3x3 stride-1 stem and no max-pool, global average pooling to 512-d
    features; its last layer maps them to the embedding (``n_embedding``).

    Built from torchvision's ResNet (the same blocks and 1x1-conv shortcuts as OpenOOD's own
    code); the initialisation is torchvision's (Kaiming for the convolutions, PyTorch's default
    for the new stem), OpenOOD's is PyTorch's default throughout. Parameter names follow
    torchvision (``downsample``), so OpenOOD's checkpoints (``shortcut``) do not load as is.
    """

    def __init__(self, n_embedding: int, in_channels: int = 3):
        from torchvision.models.resnet import BasicBlock, ResNet

        super().__init__()
        self.n_embedding = n_embedding
        self.net = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=n_embedding)
        self.net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.net.maxpool = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@torch.no_grad()
def output_width(backbone: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Width of the backbone's output for one input of ``input_shape`` (C, H, W), computed
    where the backbone's weights are."""
    was_training = backbone.training
    device = next(iter(backbone.parameters()), torch.empty(0)).device  # cpu: no weights, no device to match
    backbone.eval()
    try:
        return backbone(torch.zeros(1, *input_shape, device=device)).shape[1]
    finally:
        backbone.train(was_training)


#: parameters of the pretrained network's output layer, never loaded: our last layer is new
OUTPUT_LAYER = "fc."


def load_pretrained(backbone: nn.Module, source: str, trust: bool = False) -> dict[str, list[str]]:
    """Initialise ``backbone`` from a checkpoint file or a pytorch-ood model name.

    ``source`` is either a file holding a state dict (Hendrycks' ImageNet WRN format: possibly
    nested under ``state_dict``/``model``/..., keys possibly prefixed with ``module.``) or a
    pytorch-ood registry name such as ``wrn-40-2/imagenet32-nocifar/crossentropy``
    (the registry's hash-checked file, downloaded by torch.hub). The output layer ``fc`` is
    dropped. Every other parameter of the backbone must be in the checkpoint with the same shape,
    else :class:`~mchad.errors.ConfigError`. Files are read weights-only (nothing in them
    runs); one that needs arbitrary unpickling is refused unless ``trust``
    (``trust_checkpoint=true``). Returns the ``loaded``, ``dropped`` and ``unexpected`` keys
    (also logged).
    """
    from pathlib import Path

    from mchad.errors import ConfigError

    path = Path(str(source)).expanduser()
    if path.is_file():
        state = _read_checkpoint(path, trust)
    elif path.exists():
        raise ConfigError(f"model.pretrained_checkpoint={source}: not a file")
    else:
        state = _registry_state(str(source))
    target = getattr(backbone, "net", backbone)  # WideResNetBackbone wraps pytorch-ood's network
    own = target.state_dict()
    state = {_strip_prefixes(key): value for key, value in state.items()}
    loaded, dropped, mismatched = {}, [], []
    for key, value in state.items():
        if key.startswith(OUTPUT_LAYER):
            dropped.append(key)
        elif key in own and own[key].shape != value.shape:
            mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}")
        elif key in own:
            loaded[key] = value
    unexpected = [k for k in state if k not in own and not k.startswith(OUTPUT_LAYER)]
    missing = [
        k for k in own if k not in loaded and not k.startswith(OUTPUT_LAYER) and not k.endswith("num_batches_tracked")
    ]
    if missing or mismatched:
        problems = mismatched + [
            f"{k} (missing)" for k in missing if not any(m.startswith(k + " ") for m in mismatched)
        ]
        raise ConfigError(
            f"model.pretrained_checkpoint={source} does not match the backbone {type(target).__name__}: "
            f"{len(problems)} of {len(own)} tensors missing or of another shape, e.g. {', '.join(problems[:3])}"
        )
    target.load_state_dict(loaded, strict=False)
    log.info(
        "Loaded %d tensors from %s into the backbone; dropped the output layer (%s)%s",
        len(loaded),
        source,
        ", ".join(dropped) or "not in the checkpoint",
        f"; ignored {len(unexpected)} unexpected keys: {', '.join(unexpected[:5])}" if unexpected else "",
    )
    return {"loaded": sorted(loaded), "dropped": dropped, "unexpected": unexpected}


def _strip_prefixes(key: str) -> str:
    while key.startswith("module."):  # torch.nn.DataParallel, possibly nested
        key = key[len("module.") :]
    return key


def _read_checkpoint(path, trust: bool = False) -> dict[str, Tensor]:
    from mchad.checkpoints import safe_torch_load
    from mchad.errors import ConfigError, UnsafeCheckpointError

    try:
        data = safe_torch_load(path, "model.pretrained_checkpoint", trust)
    except UnsafeCheckpointError:
        raise
    except Exception as error:
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"model.pretrained_checkpoint={path} is not a readable PyTorch checkpoint ({reason})"
        ) from None
    # unwrap {"state_dict": {...}}, {"model": {...}}, ... until a dict of tensors remains
    for _ in range(3):
        if isinstance(data, dict) and data and all(isinstance(v, Tensor) for v in data.values()):
            return dict(data)
        if not isinstance(data, dict):
            break
        nested = [
            data[k]
            for k in ("state_dict", "model_state_dict", "model", "net", "network")
            if isinstance(data.get(k), dict)
        ]
        if not nested:
            break
        data = nested[0]
    raise ConfigError(
        f"model.pretrained_checkpoint={path} holds no state dict (a dict of tensors, possibly under 'state_dict')"
    )


def _registry_state(name: str) -> dict[str, Tensor]:
    from pytorch_ood.model import get_model_info

    from mchad.errors import ConfigError

    try:
        entry = get_model_info(name)
    except ValueError:
        raise ConfigError(
            f"model.pretrained_checkpoint={name} is neither a file nor a pytorch-ood model name "
            "(e.g. wrn-40-2/imagenet32-nocifar/crossentropy, see pytorch_ood.model.list_models())"
        ) from None
    try:
        # pytorch-ood's load_model unpickles the download fully (torch.hub's weights_only=False);
        # the same hash-checked file, read weights-only
        state = torch.hub.load_state_dict_from_url(
            entry.url, map_location="cpu", file_name=entry.file_name, check_hash=True, weights_only=True
        )
        return entry.state_dict_transform(state) if entry.state_dict_transform is not None else state
    except Exception as error:
        reason = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"could not download the pytorch-ood model {name} ({reason}); download {entry.url} where there is "
            f"internet and pass the file: ++model.pretrained_checkpoint=/path/to/{entry.url.rsplit('/', 1)[-1]}"
        ) from None
