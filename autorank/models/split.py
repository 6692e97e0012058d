"""Cutting a model into a frozen prefix and a trained suffix (torch only).

A Sequential of blocks can be cut at a block boundary: everything before the first trained layer
is a frozen prefix whose output the workload caches (`split_at_first_trained`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from torch import nn

from autorank.shortcut import ShortcutLayer


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


def transformer_blocks(model: nn.Module) -> list[tuple[str, list[str]]]:
    """(block name, its nn.Linear layers' names) for each block of a transformer, in order.

    The blocks are the children of the longest nn.ModuleList / nn.Sequential whose children are
    all of one type holding linear layers (a Llama's `model.layers.N`, the ViT's
    `encoder.layers.encoder_layer_N`). [] when the model has no such stack."""
    best: tuple[str, list[tuple[str, nn.Module]]] | None = None
    for name, m in model.named_modules():
        if not isinstance(m, (nn.ModuleList, nn.Sequential)):
            continue
        kids = list(m.named_children())
        if len(kids) < 1 or len({type(k) for _, k in kids}) != 1:
            continue
        if not all(any(isinstance(s, nn.Linear) for s in k.modules()) for _, k in kids):
            continue
        if best is None or len(kids) > len(best[1]):
            best = (name, kids)
    if best is None:
        return []
    prefix = best[0] + "." if best[0] else ""
    return [(prefix + kname, [f"{prefix}{kname}.{n}" for n in _linears(k)]) for kname, k in best[1]]


def _linears(block: nn.Module) -> list[str]:
    """Names of the linear layers of `block`, a plan applied to it seen through (a ShortcutLayer
    around a linear layer counts as that layer; its insides are not the model's, unless it keeps
    the original's submodules: keeps_children)."""
    names, inside = [], []
    for name, m in block.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, ShortcutLayer) and not m.keeps_children:
            inside.append(name)
            if isinstance(m.get_base_layer(), nn.Linear):
                names.append(name)
        elif isinstance(m, nn.Linear):
            names.append(name)
    return names
