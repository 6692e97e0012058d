"""Model factories, all returning `nn.Sequential` of blocks with the usual module names, and the
classifier head a downstream task replaces.

A plan file names its model as `autorank.models:<factory>` with keyword arguments; the device
runner rebuilds it from that with torch alone. torchvision is imported only by the factories that
wrap its networks; no training code lives here.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


def _conv_bn_act(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=False))
    return nn.Sequential(*layers)


def small_cnn(num_classes: int = 10, in_channels: int = 3, width: int = 8) -> nn.Sequential:
    """A few thousand parameters: for fast tests."""
    w = width
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(in_channels, w, 3, 1, 1, bias=False),
            bn1=nn.BatchNorm2d(w),
            relu1=nn.ReLU(),
            conv2=nn.Conv2d(w, 2 * w, 3, 2, 1, bias=False),
            bn2=nn.BatchNorm2d(2 * w),
            relu2=nn.ReLU(),
            conv3=nn.Conv2d(2 * w, 4 * w, 3, 2, 1, bias=False),
            bn3=nn.BatchNorm2d(4 * w),
            relu3=nn.ReLU(),
            pool=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1)),
            fc=nn.Linear(4 * w, num_classes),
        )
    )


class InvertedResidual(nn.Module):
    """MobileNetV2/MCUNet block: 1x1 expand, kxk depthwise, 1x1 project (no activation), skip if shapes match.

    Module names follow torchvision: `conv.0.0` expand conv (absent when expand ratio is 1),
    then the depthwise and the projection convs.
    """

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int, kernel_size: int = 3) -> None:
        super().__init__()
        hidden = cin * expand_ratio
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_act(cin, hidden, 1))
        layers += [
            _conv_bn_act(hidden, hidden, kernel_size, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.use_res_connect else y


# (expand ratio t, channels c, repeats n, first stride s, kernel k): an MCUNet-like mix of
# kernel sizes 3/5/7 and expand ratios 3-6 (after MCUNet's ImageNet models, Lin et al. 2020).
MCUNET_SETTINGS: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 16, 1, 1, 3),
    (4, 24, 2, 2, 5),
    (4, 40, 3, 2, 7),
    (4, 64, 3, 2, 5),
    (5, 96, 2, 1, 5),
    (5, 160, 2, 2, 7),
    (4, 160, 1, 1, 3),
)


def mcunet_like(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0) -> nn.Sequential:
    """MCUNet-style inverted-residual net with ReLU6 (about 1.0 M parameters at width 1)."""

    def ch(c: int) -> int:
        return max(8, int(round(c * width_mult / 8)) * 8)

    cin = ch(32)
    features: list[nn.Module] = [_conv_bn_act(in_channels, cin, 3, 2)]
    for t, c, n, s, k in MCUNET_SETTINGS:
        for i in range(n):
            features.append(InvertedResidual(cin, ch(c), s if i == 0 else 1, t, k))
            cin = ch(c)
    return nn.Sequential(
        OrderedDict(
            features=nn.Sequential(*features),
            pool=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1)),
            classifier=nn.Sequential(nn.Dropout(0.2), nn.Linear(cin, num_classes)),
        )
    )


def mobilenet_v2(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0) -> nn.Sequential:
    """torchvision MobileNetV2 (weights=None: nothing is downloaded) as Sequential(features, pool, classifier)."""
    from torchvision.models import mobilenet_v2 as tv_mobilenet_v2

    tv = tv_mobilenet_v2(weights=None, num_classes=num_classes, width_mult=width_mult)
    if in_channels != 3:
        old = tv.features[0][0]
        tv.features[0][0] = nn.Conv2d(in_channels, old.out_channels, 3, 2, 1, bias=False)
    return nn.Sequential(
        OrderedDict(
            features=tv.features,
            pool=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1)),
            classifier=tv.classifier,
        )
    )


def resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Sequential:
    """torchvision ResNet18 (weights=None) as Sequential(conv1, bn1, relu, maxpool, layer1..4, avgpool, flatten, fc)."""
    from torchvision.models import resnet18 as tv_resnet18

    tv = tv_resnet18(weights=None, num_classes=num_classes)
    if in_channels != 3:
        tv.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"]
    parts = OrderedDict((n, getattr(tv, n)) for n in names)
    parts["flatten"] = nn.Flatten(1)
    parts["fc"] = tv.fc
    return nn.Sequential(parts)


def classifier_name(model: nn.Module) -> str:
    """Name of the last nn.Linear: the head replaced for the downstream task."""
    last = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ValueError("model has no nn.Linear head")
    return last[-1]


def replace_head(model: nn.Module, num_classes: int, seed: int = 0) -> nn.Module:
    """A fresh nn.Linear head with `num_classes` outputs (deterministic init from `seed`), in place."""
    name = classifier_name(model)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old: nn.Linear = getattr(parent, child)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    setattr(parent, child, new)
    return model
