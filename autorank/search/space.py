"""Search spaces: which layers are candidates and what each may become.

The `space` config group (autorank/conf/space/*.yaml: `space=last4`) holds the packaged ones; a
file of your own is `space.path=/abs/my_space.yaml`. A space file:

    name: last8
    last: 8                  # the last 8 conv/linear layers of the model, counted from the output
    first: 8                 # and the first 8 (where the large activations are)
    spread: 4                # and 4 more, evenly spaced over the layers in between
    # layers: [features.17.conv.2, classifier.1]   # or explicit module names (wins over `last`)
    choices: [frozen, full, asi]                   # asi expands to one choice per level and variant
                                   # lora (linear layers only): one choice per LoRA rank (lora@4);
                                   # lora_asi: LoRA + ASI on A's input, per rank and level (lora@4+asi@0.9)
    lora_ranks: [4, 8]             # the LoRA ranks of lora / lora_asi
    levels: [0.8, 0.9, 0.95]                       # HOSVD_eps explained-variance levels
    variants: [all, keep_batch]    # all: the level on every mode (asi@0.9); keep_batch: the batch
                                   # mode kept whole, rank[0] = B (asi@0.9:b)
    head: full                     # the last candidate (the fresh classifier) is always `full`
                                   # (never frozen, never ASI); `search`: searched like the others
    hparams:                       # trainer settings searched with the plan (Optuna suggest_float)
      lr: {low: 0.003, high: 0.1, log: true, default: 0.01}  # default (optional): the warm starts'
    overrides:                                     # per-layer choice lists (module name -> choices)
      classifier.1: [full, asi]
    fill: frozen                   # layers between candidates that are not candidates themselves:
                                   # frozen (they only pass gradients on), or full: every layer after
                                   # the first trained one trains plainly (a contiguous trained region,
                                   # as when fine-tuning "from layer k on")
    recompute: blocks              # blocks the search may recompute in the backward (activation
                                   # checkpointing): `blocks`, every block holding a candidate, or a
                                   # list of block names; absent: none
    bn: frozen
    lean: true

A choice key is a string: `frozen`, `full`, `asi@<level>` (e.g. `asi@0.8`) or `asi@<level>:b`
(the level's ranks with the batch mode kept whole), `lora@<rank>` (LoRA beside the frozen weight:
plan Choice.lora(rank)) or `lora@<rank>+asi@<level>` (LoRA whose A keeps its input at the level's
ASI ranks: Choice.lora(rank, ranks)), or, for a block the space's `recompute` offers, `recompute`
(the block recomputed in the backward: plan Choice.recompute()) or `frozen` (kept as it is). The
methods own these keys (autorank.methods); the ASI ranks come from the profile (HOSVD_eps ranks on
calibration batches). LoRA keys apply to nn.Linear layers only: the profile drops them for convs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import nn

from autorank.errors import ConfigError, ConfigFileNotFound
from autorank.io import read_mapping
from autorank.methods import KEEP_BATCH, parse_key, space_choices, space_method
from autorank.methods import level_key, lora_key, parse_lora_key  # noqa: F401  (the search's names for them)
from autorank.models.split import flatten_blocks, transformer_blocks
from autorank.plan import candidate_layers

SPACES_DIR = Path(__file__).resolve().parents[1] / "conf" / "space"  # the `space` config group
BASE_CHOICES = space_choices()  # every method's space-file choices: frozen, full, asi, lora, lora_asi
LORA_CHOICES = ("lora", "lora_asi")  # expand to lora@<rank>[+asi@<level>] keys
VARIANTS = ("all", "keep_batch")  # which ASI rank variants a space offers
RECOMPUTE_ALL = "blocks"  # `recompute: blocks`: every block that holds a candidate layer
BLOCK_CHOICES = ("frozen", "recompute")  # the keys of a block: kept as it is, or recomputed
HEAD_RULES = ("full", "search")
HPARAM_KEYS = ("lr", "momentum", "weight_decay")
FILLS = ("frozen", "full")  # what the non-candidate layers after the first trained one do  # trainer settings Workload.finetune overrides


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _list_of(check) -> Any:
    return lambda v: isinstance(v, Sequence) and not isinstance(v, str) and all(check(x) for x in v)


_STR = lambda v: isinstance(v, str)  # noqa: E731
_NUM = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
# key -> (check, the form a space file must give): a value of another type is one ConfigError
FORMS: dict[str, tuple[Any, str]] = {
    "name": (_STR, "a name"), "bn": (_STR, "a string"), "head": (_STR, f"one of {HEAD_RULES}"),
    "fill": (_STR, f"one of {FILLS}"), "lean": (lambda v: isinstance(v, bool), "true or false"),
    "last": (lambda v: v is None or _whole(v), "a whole number >= 1, or null"),
    "first": (_whole, "a whole number >= 0"), "spread": (_whole, "a whole number >= 0"),
    "layers": (lambda v: v is None or _list_of(_STR)(v), "a list of module names, or null"),
    "choices": (_list_of(_STR), f"a list of choices from {BASE_CHOICES}"),
    "variants": (_list_of(_STR), f"a list from {VARIANTS}"),
    "levels": (_list_of(_NUM), "a list of numbers in (0, 1]"),
    "lora_ranks": (_list_of(_whole), "a list of whole numbers >= 1"),
    "overrides": (lambda v: isinstance(v, Mapping) and all(_list_of(_STR)(c) for c in v.values()),
                  "a mapping of module name -> list of choices"),
    "recompute": (lambda v: v is None or v == RECOMPUTE_ALL or _list_of(_STR)(v),
                  f"{RECOMPUTE_ALL!r} (every block holding a candidate) or a list of block names"),
    "hparams": (lambda v: isinstance(v, Mapping) and all(isinstance(r, Mapping) and all(
        _NUM(x) or isinstance(x, bool) or x is None for x in r.values()) for r in v.values()),
                "a mapping such as {lr: {low: 0.003, high: 0.1, log: true}}"),
}


def check_forms(d: Mapping[str, Any], where: str = "search space") -> None:
    """ConfigError naming the first key whose value has the wrong type (`last: "abc"`, a list
    where a number belongs), before anything converts or compares it."""
    for k, v in d.items():
        check, form = FORMS.get(k, (lambda _: True, ""))
        if v is not None and not check(v) or (v is None and k not in ("last", "layers", "overrides", "hparams", "recompute")):
            raise ConfigError(f"{where}: `{k}: {v!r}` is not allowed: expected {form}")


def parse_choice_key(key: str) -> tuple[str, float | None]:
    """'asi@0.8' -> ('asi', 0.8); 'asi@0.8:b' -> ('asi', 0.8); 'full' -> ('full', None);
    'lora@4' -> ('lora', None); 'lora@4+asi@0.9' -> ('lora', 0.9) (the rank: parse_lora_key);
    'recompute' -> ('recompute', None). The methods read their own keys (autorank.methods)."""
    info = parse_key(key)
    return info.kind, info.level


def keeps_batch(key: str) -> bool:
    """Whether an ASI choice key keeps the batch mode whole (rank[0] = B)."""
    return key.startswith("asi@") and key.endswith(KEEP_BATCH)


def conv_linear_layers(model: nn.Module) -> list[str]:
    """Conv and linear module names in forward (registration) order."""
    return list(candidate_layers(model))


@dataclass(frozen=True)
class SearchSpace:
    name: str = "default"
    last: int | None = 8
    first: int = 0
    spread: int = 0
    layers: tuple[str, ...] | None = None
    choices: tuple[str, ...] = ("frozen", "full", "asi")
    levels: tuple[float, ...] = (0.8, 0.9, 0.95)
    overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)
    bn: str = "frozen"
    lean: bool = True
    variants: tuple[str, ...] = ("all",)
    head: str = "full"
    hparams: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {low, high, log}
    fill: str = "frozen"
    lora_ranks: tuple[int, ...] = (4, 8)
    recompute: str | tuple[str, ...] | None = None  # blocks offered for recomputation

    def __post_init__(self) -> None:
        for c in list(self.choices) + [c for cs in self.overrides.values() for c in cs]:
            if c not in BASE_CHOICES:
                raise ConfigError(f"space {self.name!r}: unknown choice {c!r} (use {BASE_CHOICES})")
        if not self.lora_ranks or any(int(r) < 1 for r in self.lora_ranks):
            raise ConfigError(f"space {self.name!r}: lora_ranks must be ints >= 1, got {self.lora_ranks}")
        if self.spread < 0 or self.first < 0:
            raise ConfigError(f"space {self.name!r}: first and spread must be >= 0")
        if self.layers is None and (self.last is None or self.last < 1):
            raise ConfigError(f"space {self.name!r}: give `layers` or `last` >= 1")
        if any(not 0.0 < lv <= 1.0 for lv in self.levels):
            raise ConfigError(f"space {self.name!r}: levels must lie in (0, 1], got {self.levels}")
        if not self.variants or any(v not in VARIANTS for v in self.variants):
            raise ConfigError(f"space {self.name!r}: variants must be some of {VARIANTS}, got {self.variants}")
        if self.fill not in FILLS:
            raise ConfigError(f"space {self.name!r}: fill must be one of {FILLS}, got {self.fill!r}")
        if isinstance(self.recompute, str) and self.recompute != RECOMPUTE_ALL:
            raise ConfigError(f"space {self.name!r}: recompute must be {RECOMPUTE_ALL!r} or a list of block "
                              f"names, got {self.recompute!r}")
        if self.head not in HEAD_RULES:
            raise ConfigError(f"space {self.name!r}: head must be one of {HEAD_RULES}, got {self.head!r}")
        for k, r in self.hparams.items():
            if k not in HPARAM_KEYS or not {"low", "high"} <= set(r) or not set(r) <= {"low", "high", "log", "default"}:
                raise ConfigError(f"space {self.name!r}: hparams.{k}: expected one of {HPARAM_KEYS} "
                                  f"with {{low, high, log, default}} (default optional), got {r}")
            if not 0 <= float(r["low"]) <= float(r["high"]) or (r.get("log") and float(r["low"]) <= 0):
                raise ConfigError(f"space {self.name!r}: hparams.{k}: need 0 <= low <= high (low > 0 if log)")
            if r.get("default") is not None and not float(r["low"]) <= float(r["default"]) <= float(r["high"]):
                raise ConfigError(f"space {self.name!r}: hparams.{k}.default {r['default']} lies outside "
                                  f"[{r['low']}, {r['high']}]: move it inside or remove it")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SearchSpace":
        d = dict(d)
        known = {"name", "last", "first", "spread", "layers", "choices", "levels", "overrides", "bn",
                 "lean", "variants", "head", "hparams", "fill", "lora_ranks", "recompute"}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"search space: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        check_forms(d)
        if d.get("layers") is not None:
            d["layers"] = tuple(d["layers"])
        d["hparams"] = {k: dict(v) for k, v in (d.get("hparams") or {}).items()}
        for k in ("choices", "levels", "variants", "lora_ranks"):
            if k in d:
                conv = {"levels": float, "lora_ranks": int}.get(k)
                d[k] = tuple(conv(x) for x in d[k]) if conv else tuple(d[k])
        d["overrides"] = {k: tuple(v) for k, v in (d.get("overrides") or {}).items()}
        if isinstance(d.get("recompute"), list):
            d["recompute"] = tuple(d["recompute"])
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> "SearchSpace":
        """A YAML file, or the name of an option of the `space` config group (`default`, `last4`, ...)."""
        p = Path(path)
        if not p.exists() and not p.suffix:
            p = SPACES_DIR / f"{path}.yaml"
        if not p.exists():
            avail = sorted(q.stem for q in SPACES_DIR.glob("*.yaml"))
            raise ConfigFileNotFound(f"search space {str(path)!r} not found (available: {avail}; "
                                     "or a YAML file of your own: space.path=/abs/my_space.yaml)")
        d = read_mapping(p, what="search space file", error=ConfigError,
                         expected="a YAML mapping of search-space keys (see autorank/conf/space/default.yaml)")
        if d.pop("path", None) is not None:
            raise ConfigError(f"search space file {p}: `path` belongs on the command line "
                              "(space.path=...), not inside a space file")
        d.setdefault("name", p.stem)
        check_forms(d, f"search space file {p}")
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "last": self.last, "first": self.first, "spread": self.spread,
            "layers": list(self.layers) if self.layers is not None else None,
            "choices": list(self.choices), "levels": list(self.levels),
            "overrides": {k: list(v) for k, v in sorted(self.overrides.items())},
            "bn": self.bn, "lean": self.lean, "variants": list(self.variants), "head": self.head,
            "hparams": {k: dict(v) for k, v in sorted(self.hparams.items())},
            **({"fill": self.fill} if self.fill != "frozen" else {}),  # old spaces keep their sha
            **({"lora_ranks": list(self.lora_ranks)} if self.uses_lora else {}),
            **({"recompute": self.recompute if isinstance(self.recompute, str) else list(self.recompute)}
               if self.recompute is not None else {}),
        }

    @property
    def uses_lora(self) -> bool:
        """Whether any layer may take a LoRA choice."""
        offered = set(self.choices) | {c for cs in self.overrides.values() for c in cs}
        return bool(offered & set(LORA_CHOICES))

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def resolve(self, model: nn.Module) -> list[str]:
        """Candidate layer names of `model`, in forward order."""
        names = conv_linear_layers(model)
        if self.layers is not None:
            missing = [n for n in self.layers if n not in names]
            if missing:
                raise ConfigError(f"space {self.name!r}: layers {missing} are not conv/linear "
                                 f"layers of the model (last ones: {names[-8:]})")
            return [n for n in names if n in self.layers]
        if self.last > len(names):
            raise ConfigError(f"space {self.name!r}: last={self.last} but the model has only "
                             f"{len(names)} conv/linear layers")
        if self.last + self.first > len(names):
            raise ConfigError(f"space {self.name!r}: first={self.first} + last={self.last} exceed the "
                             f"model's {len(names)} conv/linear layers")
        head, tail = names[:self.first], names[len(names) - self.last:]
        middle = names[self.first:len(names) - self.last]
        picked = set(head) | set(tail)
        if self.spread > 0 and middle:
            # `spread` layers evenly spaced over the layers between `first` and `last`.
            k = min(self.spread, len(middle))
            picked |= {middle[round(i * (len(middle) - 1) / max(k - 1, 1))] for i in range(k)}
        return [n for n in names if n in picked]

    def fill_order(self, model: nn.Module) -> list[str]:
        """Every conv/linear layer of `model` in forward order when `fill: full` (the profile
        keeps it so plans fill the region after their first trained layer), else []."""
        return conv_linear_layers(model) if self.fill == "full" else []

    def layer_choices(self, layer: str, *, head: bool = False) -> list[str]:
        """Expanded choice keys of one layer: frozen, full, asi@<level>, asi@<level>:b... The
        head (the last candidate, a freshly initialised classifier) is only `full` under the
        `head: full` rule: a frozen fresh head stays random, ASI on it only cost accuracy."""
        if head and self.head == "full":
            return ["full"]
        out: list[str] = []
        for c in self.overrides.get(layer, self.choices):
            out.extend(space_method(c).expand(c, self))
        return out

    def recompute_blocks(self, model: nn.Module) -> list[str]:
        """The blocks the search may recompute (each takes BLOCK_CHOICES), in forward order:
        `recompute: blocks` every block holding a candidate layer (a transformer's blocks, else
        the blocks of a Sequential model), or the names listed. [] without the option."""
        if self.recompute is None:
            return []
        blocks = [b for b, _ in transformer_blocks(model)] or [b for b, _ in flatten_blocks(model) if b]
        if self.recompute == RECOMPUTE_ALL:
            cands = self.resolve(model)
            return [b for b in blocks if any(c.startswith(b + ".") for c in cands)]
        names = dict(model.named_modules())
        bad = [b for b in self.recompute if b not in names or not b or next(names[b].children(), None) is None]
        if bad:
            raise ConfigError(f"space {self.name!r}: recompute names {bad}, which are no blocks of the model "
                              f"(its blocks: {blocks[:3]} ... {blocks[-2:]}); or use recompute: {RECOMPUTE_ALL}")
        order = {n: i for i, n in enumerate(names)}
        return sorted(self.recompute, key=order.__getitem__)

    def hparam_defaults(self, defaults: Mapping[str, float]) -> dict[str, float]:
        """The warm-start value of each searched hparam: the range's own `default` where the space
        gives one (a model whose best lr differs from the trainer's), else `defaults` (the
        trainer's), clipped into the hparam's range."""
        return {k: float(r["default"]) if r.get("default") is not None
                else min(max(float(defaults[k]), float(r["low"])), float(r["high"]))
                for k, r in self.hparams.items() if k in defaults}


    def hparam_probe(self, warm: Mapping[str, float]) -> dict[str, float]:
        """The top of each searched hparam's range where it differs from the warm-start value
        `warm`: the second value warm starts try the deepest exact plan at (a workload whose best
        lr is above the trainer's is found in the first trials, not left to the sampler)."""
        return {k: float(r["high"]) for k, r in self.hparams.items() if k in warm and float(r["high"]) != warm[k]}


def load_space(space: "str | Path | SearchSpace | Mapping[str, Any]") -> SearchSpace:
    """The search space from a SearchSpace; the composed `space` config group (a mapping: its
    keys, or with `path` set the file it names); or a group option's name or a YAML path
    (`search.space=last4`, the form from before the `space` group)."""
    if isinstance(space, SearchSpace):
        return space
    if isinstance(space, Mapping):
        d = dict(space)
        path = d.pop("path", None)
        return SearchSpace.load(path) if path is not None else SearchSpace.from_dict(d)
    return SearchSpace.load(space)
