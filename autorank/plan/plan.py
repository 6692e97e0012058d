"""The plan file: per-layer choices keyed by module name, stamped with a model fingerprint.

A plan is to autorank what adapter_config.json is to peft: it says which layers train and how,
and carries the names, types and weight shapes of the model it was made for, so applying it to
another model fails loudly. Files are YAML (or JSON, by suffix), read with yaml.safe_load /
json.load only: loading a plan never executes code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch.nn as nn
import yaml

import autorank
from autorank.errors import PlanError
from autorank.io import atomic_write, read_mapping  # atomic_write re-exported: autorank.plan.atomic_write
from autorank.plan.choice import KINDS, Choice  # re-exported: autorank.plan.plan.Choice
from autorank.shortcut import ShortcutLayer

FORMAT_VERSION = 1
BN_MODES = ("frozen", "train")
# A plan file is read on devices from wherever it came: a larger file, or one whose YAML aliases
# expand past this many values, is refused before anything is built from it. The plan of a
# large language model (its fingerprint lists every layer) is well under both.
MAX_PLAN_BYTES = 16 * 2**20
MAX_PLAN_NODES = 1_000_000
MAX_DIM = 2**31 - 1  # one dimension of an input shape
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed takes


class _NoAliasDumper(yaml.SafeDumper):
    """Writes a value met twice in full (no &anchor / *alias): plan files never hold aliases."""

    def ignore_aliases(self, data) -> bool:
        return True


@dataclasses.dataclass(frozen=True)
class FineTuneSettings:
    """How the search fine-tuned a plan, so that a device repeats it with torch alone: the model
    factory ('module:function', torch only) and its kwargs, the input shape the plan was costed
    for (B, C, H, W), SGD lr and momentum, the seed of the fresh classifier head, and the length
    (epochs, or max_steps when set). Stored in the plan file as meta["finetune"]."""

    model_factory: str
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    input_shape: tuple[int, ...] = ()
    lr: float | None = None  # None: not recorded (plans written before the search recorded it)
    momentum: float = 0.9
    seed: int = 0
    epochs: int | None = None
    max_steps: int | None = None
    weight_decay: float = 0.0

    def __post_init__(self):
        if ":" not in self.model_factory:
            raise ValueError(f"model_factory must be 'module:function', got {self.model_factory!r}")
        object.__setattr__(self, "model_kwargs", dict(self.model_kwargs))
        object.__setattr__(self, "input_shape", tuple(int(s) for s in self.input_shape))
        if len(self.input_shape) > 8 or any(not 1 <= s <= MAX_DIM for s in self.input_shape):
            raise ValueError(f"input_shape must be at most 8 sizes, each in [1, {MAX_DIM}], "
                             f"got {list(self.input_shape)}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and 0 < self.lr < float("inf")):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) \
                or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ValueError(f"seed must be a whole number in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d

    @classmethod
    def from_plan(cls, plan: "Plan") -> FineTuneSettings | None:
        """The plan's settings; files written before meta["finetune"] existed carry them as
        meta.model {factory, kwargs}, meta.lr, meta.seed, meta.input_shape. None: none recorded."""
        meta = plan.meta
        ft = meta.get("finetune")
        if isinstance(ft, dict) and "model_factory" in ft:
            return cls(**ft)
        model = meta.get("model")
        if not isinstance(model, dict) or not model.get("factory"):
            return None
        lr = meta.get("lr", ft.get("lr") if isinstance(ft, dict) else None)
        return cls(model_factory=str(model["factory"]), model_kwargs=dict(model.get("kwargs") or {}),
                   input_shape=tuple(meta.get("input_shape") or ()), lr=lr, seed=int(meta.get("seed", 0)))


def _shortcut_base(module: nn.Module) -> nn.Module:
    """The original module behind a ShortcutLayer (peft-style `base_layer`), or the module itself."""
    while isinstance(module, ShortcutLayer):
        module = module.base_layer
    return module


def original_modules(model: nn.Module):
    """(name, module) pairs of the model as it was before any plan: ShortcutLayers are seen
    through (their base_layer takes their name) and their internals are skipped, except a
    container companion's (keeps_children): its submodules are the original's, under their names."""
    skip: set[str] = set()
    for name, module in model.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if isinstance(module, ShortcutLayer):
            if not module.keeps_children:
                skip.add(name)  # wrapper internals (base_layer, ...) are not the original model's
            yield name, _shortcut_base(module)
        else:
            yield name, module




def model_fingerprint(model: nn.Module) -> dict:
    """Names, types and weight shapes of the model's leaf modules (a plan applied to it is seen
    through), and their sha256. Two models take the same plans iff their fingerprints match."""
    layers = []
    for name, module in original_modules(model):
        if name == "" or next(module.children(), None) is not None:
            continue  # only leaves: containers carry no weights of their own
        weight = getattr(module, "weight", None)
        shape = list(weight.shape) if weight is not None else None
        layers.append([name, type(module).__name__, shape])
    digest = hashlib.sha256(json.dumps(layers, separators=(",", ":")).encode()).hexdigest()
    return {"sha256": digest, "layers": layers}


def check_fingerprint_form(fingerprint: Any) -> None:
    """PlanError unless `fingerprint` has model_fingerprint()'s form."""
    layers = fingerprint.get("layers", []) if isinstance(fingerprint, dict) else None
    if not isinstance(layers, list) or not all(isinstance(w, list) and w for w in layers) \
            or not isinstance(fingerprint.get("sha256", ""), str):
        raise PlanError("the plan's fingerprint is malformed: expected {sha256: ..., layers: [[name, "
                        "type, shape], ...]} as model_fingerprint() writes it")


def check_fingerprint(expected: dict, model: nn.Module) -> None:
    """PlanError (a ValueError) naming the first layer where `model` differs from the `expected`
    fingerprint."""
    check_fingerprint_form(expected)
    actual = model_fingerprint(model)
    if actual["sha256"] == expected.get("sha256"):
        return
    want, have = expected.get("layers", []), actual["layers"]
    for i in range(max(len(want), len(have))):
        w = want[i] if i < len(want) else None
        h = have[i] if i < len(have) else None
        if w is None or h is None or list(w) != list(h):
            name = (w or h)[0]
            raise PlanError(
                f"plan does not fit this model: first mismatched layer {name!r} "
                f"(plan made for {w}, model has {h})"
            )
    raise PlanError("plan does not fit this model: fingerprint sha256 differs")


@dataclasses.dataclass
class Plan:
    """Module name -> Choice for the conv/linear layers (a layer not listed is frozen).

    bn: 'frozen' (BN inside the trained region becomes a fixed affine op) or 'train' (left as it
    is, affine trained). lean: swap BN / ReLU / frozen conv / SwiGLU MLPs inside the trained region
    for the lean companions of autorank.shortcut.lean and lean_llm. meta: free-form (level names,
    source).
    fingerprint: model_fingerprint() of the model the plan was made for, or None (names checked
    only).
    """

    layers: dict[str, Choice] = dataclasses.field(default_factory=dict)
    bn: str = "frozen"
    lean: bool = True
    meta: dict = dataclasses.field(default_factory=dict)
    fingerprint: dict | None = None

    def __post_init__(self):
        if self.bn not in BN_MODES:
            raise PlanError(f"bn must be one of {BN_MODES}, got {self.bn!r}")
        self.layers = {
            str(k): (v if isinstance(v, Choice) else Choice.parse(v)) for k, v in self.layers.items()
        }
        self.lean = bool(self.lean)

    def trained_layers(self) -> list[str]:
        return [name for name, c in self.layers.items() if c.trained]

    def for_model(self, model: nn.Module) -> Plan:
        """A copy stamped with `model`'s fingerprint."""
        return dataclasses.replace(self, layers=dict(self.layers), meta=dict(self.meta),
                                   fingerprint=model_fingerprint(model))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "autorank_version": autorank.__version__,
            "bn": self.bn,
            "lean": self.lean,
            "layers": {name: str(c) for name, c in self.layers.items()},
            "meta": self.meta,
        }
        if self.fingerprint is not None:
            d["fingerprint"] = self.fingerprint
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        """A Plan from to_dict()'s form; PlanError names what is wrong."""
        if not isinstance(d, dict):
            raise PlanError(f"a plan must be a mapping, got {type(d).__name__}")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise PlanError(f"unsupported plan format_version {version!r} (this autorank reads {FORMAT_VERSION})")
        unknown = set(d) - {"format_version", "autorank_version", "bn", "lean", "layers", "meta", "fingerprint"}
        if unknown:
            raise PlanError(f"unknown plan keys: {sorted(unknown)}")
        for key, kind in (("layers", dict), ("meta", dict), ("fingerprint", dict), ("bn", str), ("lean", bool)):
            if d.get(key) is not None and not isinstance(d[key], kind):
                raise PlanError(f"plan key {key!r} must be a {kind.__name__}, got {type(d[key]).__name__}")
        if d.get("fingerprint") is not None:
            check_fingerprint_form(d["fingerprint"])
        bad = [k for k, v in (d.get("layers") or {}).items() if not isinstance(v, (str, Choice))]
        if bad:
            raise PlanError(f"plan layer {bad[0]!r}: expected a choice such as frozen, full, asi[8,64,4,4] "
                            f"or hosvd[0.8], got {d['layers'][bad[0]]!r}")
        return cls(layers=dict(d.get("layers") or {}), bn=d.get("bn", "frozen"), lean=d.get("lean", True),
                   meta=dict(d.get("meta") or {}), fingerprint=d.get("fingerprint"))

    def save(self, path, model: nn.Module | None = None) -> Path:
        """Write YAML (or JSON for a .json suffix) atomically: a temp file in the same folder is
        renamed over `path`, so a half-written file never replaces a good one. With `model`, the
        file is stamped with its fingerprint."""
        plan = self.for_model(model) if model is not None else self
        path = Path(path)
        d = plan.to_dict()
        if path.suffix.lower() == ".json":
            text = json.dumps(d, indent=2) + "\n"
        else:
            text = yaml.dump(d, Dumper=_NoAliasDumper, sort_keys=False, default_flow_style=None, width=100)
        return atomic_write(path, lambda tmp: tmp.write_text(text))

    @classmethod
    def load(cls, path) -> Plan:
        """Read a plan file (YAML, or JSON by suffix) with yaml.safe_load / json.loads only. Any
        bad file - missing, a directory, binary, empty, malformed, not a plan, larger than
        MAX_PLAN_BYTES, or YAML aliases expanding past MAX_PLAN_NODES values - is a PlanError
        naming the file, raised before anything is built from it."""
        d = read_mapping(path, what="plan file", error=PlanError, max_bytes=MAX_PLAN_BYTES, max_nodes=MAX_PLAN_NODES,
                         expected="a plan written by `python -m autorank` or Plan.save "
                                  "(a mapping with format_version, layers, bn, lean, meta)")
        try:
            return cls.from_dict(d)
        except PlanError as e:
            raise PlanError(f"{path} is not a valid plan file: {e}") from e
