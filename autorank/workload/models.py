"""Model factories, all returning `nn.Sequential` of blocks with the usual module names.

A Sequential of blocks can be cut at a block boundary: everything before the first trained layer
is a frozen prefix whose output the workload caches (`split_at_first_trained`). This file imports
only torch and torchvision; no training code lives here.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable

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


@dataclass
class ModelSpec:
    """What the `model` config group builds: a factory plus where the base weights come from.

    `build(num_classes=..., in_channels=...)` makes a fresh network. `checkpoint`: a state-dict
    file loaded with `torch.load(weights_only=True)` instead of pretraining upstream.
    """

    build: Callable[..., nn.Module]
    checkpoint: str | None = None

    @property
    def name(self) -> str:
        fn = self.build.func if isinstance(self.build, functools.partial) else self.build
        return getattr(fn, "__name__", type(fn).__name__)

    def key(self) -> dict[str, Any]:
        """What determines the architecture (for cache keys)."""
        fn = self.build.func if isinstance(self.build, functools.partial) else self.build
        kwargs = dict(self.build.keywords) if isinstance(self.build, functools.partial) else {}
        return {"factory": f"{fn.__module__}.{fn.__qualname__}", "kwargs": {k: kwargs[k] for k in sorted(kwargs)}}

    def __call__(self, num_classes: int, in_channels: int = 3) -> nn.Module:
        return self.build(num_classes=num_classes, in_channels=in_channels)


# --- cutting a model into a frozen prefix and a trained suffix ---------------------------------


def _is_plain_sequential(m: nn.Module) -> bool:
    # Subclasses of Sequential that keep its forward (torchvision's Conv2dNormActivation) may be
    # opened too; one with its own forward may not.
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def flatten_blocks(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The model's nested plain Sequentials opened into a flat list of (qualified name, block)."""
    if not _is_plain_sequential(model):
        return [(prefix, model)]
    blocks: list[tuple[str, nn.Module]] = []
    for name, child in model.named_children():
        blocks += flatten_blocks(child, f"{prefix}.{name}" if prefix else name)
    return blocks


def trained_module_names(model: nn.Module, plan_or_names: Any) -> list[str]:
    """Names of trained layers in forward (module registration) order.

    `plan_or_names`: a Plan (anything with `.layers: dict[str, Choice]`; a choice whose `kind` is
    "frozen" is not trained) or an iterable of module names.
    """
    layers = getattr(plan_or_names, "layers", None)
    if layers is not None:
        wanted = {n for n, c in layers.items() if getattr(c, "kind", c) != "frozen"}
    else:
        wanted = set(plan_or_names)
    names = [n for n, _ in model.named_modules() if n in wanted]
    missing = wanted - set(names)
    if missing:
        raise KeyError(f"trained layers not in the model: {sorted(missing)}")
    return names


def _sequential(blocks: Iterable[tuple[str, nn.Module]]) -> nn.Sequential:
    return nn.Sequential(OrderedDict((n.replace(".", "_") or "model", m) for n, m in blocks))


def split_at_first_trained(model: nn.Module, plan_or_names: Any) -> tuple[nn.Sequential, nn.Sequential]:
    """(prefix, suffix) with prefix(x) fed to suffix equal to model(x); the cut is just before the
    block that holds the first trained module. With nothing trained the suffix is empty.

    The blocks are the model's own modules (not copies): a plan applied to `model` is in the suffix.
    """
    blocks = flatten_blocks(model)
    names = trained_module_names(model, plan_or_names)
    if not names:
        return _sequential(blocks), nn.Sequential()
    first = names[0]
    for i, (bname, _) in enumerate(blocks):
        if bname == "" or first == bname or first.startswith(bname + ".") or bname.startswith(first + "."):
            return _sequential(blocks[:i]), _sequential(blocks[i:])
    raise KeyError(f"no block holds {first!r}")  # unreachable: named_modules found it


def cut_name(model: nn.Module, plan_or_names: Any) -> str:
    """Qualified name of the first block of the suffix ("" when nothing is trained)."""
    blocks = flatten_blocks(model)
    _, suffix = split_at_first_trained(model, plan_or_names)
    return blocks[len(blocks) - len(suffix)][0] if len(suffix) else ""


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
