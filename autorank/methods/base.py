"""The method registry: one `Method` object per training method, registered once.

A method owns everything the rest of autorank needs to know about it:
- its plan notation: `Choice` fields it takes (validate), `str(choice)` (format) and the
  inverse (parse);
- its search keys: the `choices` entry of a space file it answers to (`asi`, `lora_asi`, ...),
  how that expands into choice keys (`asi@0.9`, `lora@4+asi@0.9`), how a key is read back
  (`KeyInfo`), the Choice a key makes with the profile's ranks, and its short code in the
  study's summary table (`.9`, `L4`);
- how it builds the layer (`build`, the shortcut class it puts into the model, `layer_types`);
- its cost rules: `saved_rule(tracer, module, args)`, the bytes the layers it builds save for
  backward (the cost model calls it instead of tracing them), and `flop_formulas`, FLOP counts
  for the aten ops only its layers run (merged into the cost model's counter).

`register_method(m)` adds one (as peft's `register_peft_method`); each module of this package
ends with that call. The rest of autorank asks `get_method(kind)`, `parse_choice(text)`,
`parse_key(key)` and `short_code(key)`, never a chain of `if kind == ...`.

torch only (the layers are torch modules); the notation itself is plain Python.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Callable

from torch import nn

from autorank.errors import ConfigError, PlanError

MAX_RANK = 2**31 - 1  # a rank is a size of one tensor dimension; apply_plan checks it against the layer
KEEP_BATCH = ":b"  # choice-key suffix of ASI's keep_batch variant


@dataclasses.dataclass(frozen=True)
class Choice:
    """What one module does in training, in a method's terms: `kind` (the method's name) and the
    fields that method takes (`ranks`: ASI ranks, one per input mode; `eps`: HOSVD's explained
    variance; `rank`: the LoRA rank). The method validates them (`Method.validate`); `str()` is
    its plan notation and `Choice.parse` reads it back."""

    kind: str
    ranks: tuple[int, ...] | None = None
    eps: float | None = None
    rank: int | None = None  # the LoRA rank

    def __post_init__(self):
        method = _REGISTRY.get(self.kind) if isinstance(self.kind, str) else None
        if method is None:
            raise PlanError(f"unknown choice kind {self.kind!r}; expected one of {kinds()}")
        for field, value in method.validate(self).items():
            object.__setattr__(self, field, value)
        for field in ("ranks", "eps", "rank"):
            if field not in method.fields and getattr(self, field) is not None:
                raise PlanError(f"a {self.kind} choice takes no {_FIELD_WORDS[field]}")

    @classmethod
    def frozen(cls) -> Choice:
        return cls("frozen")

    @classmethod
    def full(cls) -> Choice:
        return cls("full")

    @classmethod
    def asi(cls, ranks) -> Choice:
        return cls("asi", ranks=tuple(ranks))

    @classmethod
    def hosvd(cls, eps: float) -> Choice:
        return cls("hosvd", eps=eps)

    @classmethod
    def lora(cls, rank: int, asi_ranks=None) -> Choice:
        """LoRA at `rank`; with `asi_ranks`, LoRA + ASI (A's input kept at those ranks)."""
        return cls("lora", rank=rank, ranks=None if asi_ranks is None else tuple(asi_ranks))

    @classmethod
    def recompute(cls) -> Choice:
        """A block recomputed in the backward (activation checkpointing)."""
        return cls("recompute")

    @property
    def method(self) -> Method:
        return _REGISTRY[self.kind]

    @property
    def trained(self) -> bool:
        """Whether the module's weight gets a gradient (frozen and recompute do not)."""
        return self.method.trains

    def __str__(self) -> str:
        return self.method.format(self)

    @classmethod
    def parse(cls, text: str) -> Choice:
        """Inverse of str(): 'frozen', 'full', 'asi[8,64,4,4]', 'hosvd[0.8]', 'lora[8]',
        'lora[8]+asi[8,64,32]', 'recompute'."""
        return parse_choice(text)


_FIELD_WORDS = {"ranks": "ranks", "eps": "eps", "rank": "LoRA rank"}


@dataclasses.dataclass(frozen=True)
class KeyInfo:
    """A search choice key read back: the method, the ASI level (None: none), the LoRA rank
    (None: none), whether the batch mode is kept whole (`asi@0.9:b`)."""

    kind: str
    level: float | None = None
    rank: int | None = None
    keep_batch: bool = False


class Method:
    """One training method (module doc). Subclasses set the class attributes and override what
    applies; the defaults are a method with no fields, no search key and no layer of its own."""

    name: str = ""  # the plan kind (Choice.kind)
    summary: str = ""  # one line: what it does (docs, `autorank.methods.describe()`)
    trains: bool = True  # whether the module's own weight gets a gradient
    exact: bool = False  # whether training with it computes plain training's gradients
    scope: str = "layer"  # "layer": a conv/linear layer; "module": any module (a block)
    fields: tuple[str, ...] = ()  # the Choice fields it takes
    space_choices: tuple[str, ...] = ()  # the `choices` entries of a space file it answers to
    layer_types: tuple[type, ...] = ()  # the classes `build` puts into a model
    flop_formulas: Mapping[Any, Callable[..., int]] = {}  # aten op -> FLOPs (torch's formula form)
    notation: str = ""  # the plan notation, for messages: 'asi[r,...]'

    # -- plan notation ----------------------------------------------------------------------------
    def validate(self, choice: Choice) -> dict[str, Any]:
        """The normalised values of the fields this method takes (PlanError when one is bad)."""
        return {}

    def format(self, choice: Choice) -> str:
        return self.name

    def parse(self, text: str) -> Choice | None:
        """The Choice `text` spells in this method's notation, None when it is not this method's
        (PlanError when it is, but malformed). `text` has no spaces."""
        if text == self.name:
            return Choice(self.name)
        if text.startswith(self.name + "["):
            raise PlanError(f"cannot parse choice {text!r}: {self.name} takes no argument")
        return None

    # -- search keys ------------------------------------------------------------------------------
    def expand(self, space_choice: str, space: Any) -> list[str]:
        """The choice keys one `choices` entry of `space` (a SearchSpace) stands for."""
        return [space_choice]

    def parse_key(self, key: str) -> KeyInfo | None:
        """KeyInfo of a choice key in this method's form, None when it is not (ConfigError when it
        is, but malformed)."""
        return KeyInfo(self.name) if key == self.name else None

    def key_choice(self, key: str, ranks: Mapping[str, Sequence[int]]) -> Choice:
        """The plan Choice of a key; `ranks`: the profile's ranks of the layer per key."""
        return Choice(self.name)

    def code(self, key: str) -> str:
        """The key's short code in the study's summary table."""
        return self.name

    # -- the layer --------------------------------------------------------------------------------
    def check(self, module: nn.Module, choice: Choice, name: str) -> None:
        """PlanError when `choice` cannot apply to `module` (checked before anything is built)."""

    def build(self, module: nn.Module, choice: Choice, name: str) -> nn.Module:
        """The module that takes `module`'s place (the module itself: nothing to swap)."""
        return module

    # -- cost -------------------------------------------------------------------------------------
    def saved_rule(self, tracer: Any, module: nn.Module, args: tuple) -> None:
        """Report, through `tracer.save(tensor)` (a storage kept alive) or
        `tracer.save_fresh(nbytes)` (a new one), what one training forward of `module` (one of
        `layer_types`) on `args` keeps for the backward. Called by the cost model's tracer
        instead of tracing the module's ops, when the module's output needs a gradient."""
        x = args[0]
        tracer.save_fresh(int(module.saved_bytes(tuple(x.shape), x.dtype)))


_REGISTRY: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add a method (its name must be new); returns it. Registration order is the order in which
    plan notations are tried and methods are listed."""
    if not method.name or method.name in _REGISTRY:
        raise ValueError(f"method name {method.name!r} is empty or already registered")
    _REGISTRY[method.name] = method
    return method


def kinds() -> tuple[str, ...]:
    """The registered methods' names (the plan kinds), in registration order."""
    return tuple(_REGISTRY)


def methods() -> list[Method]:
    return list(_REGISTRY.values())


def get_method(kind: str) -> Method:
    try:
        return _REGISTRY[kind]
    except KeyError:
        raise PlanError(f"unknown method {kind!r}; expected one of {kinds()}") from None


def parse_choice(text: str) -> Choice:
    """The Choice that `text` spells in some method's plan notation (PlanError: none)."""
    s = str(text).replace(" ", "")
    for method in _REGISTRY.values():
        choice = method.parse(s)
        if choice is not None:
            return choice
    forms = ", ".join(m.notation or m.name for m in _REGISTRY.values())
    raise PlanError(f"cannot parse choice {text!r}; expected one of: {forms}")


def parse_key(key: str) -> KeyInfo:
    """KeyInfo of a search choice key (ConfigError naming the known forms when none reads it)."""
    for method in _REGISTRY.values():
        info = method.parse_key(key)
        if info is not None:
            return info
    raise ConfigError(f"unknown choice {key!r}: expected frozen, full, asi@<level>, asi@<level>:b, "
                      "lora@<rank>, lora@<rank>+asi@<level> or recompute")


def method_of_key(key: str) -> Method:
    return _REGISTRY[parse_key(key).kind]


def short_code(key: str) -> str:
    """The summary table's code of a choice key ('-', 'F', '.9', '.9b', 'L4', 'L4.9', 'R')."""
    return method_of_key(key).code(key)


def key_choice(key: str, ranks: Mapping[str, Sequence[int]]) -> Choice:
    """The plan Choice of a search key, with the profile's ranks of the layer (per key)."""
    return method_of_key(key).key_choice(key, ranks)


def is_exact_key(key: str) -> bool:
    """Whether a choice key's method leaves the gradients exact (frozen, full, recompute)."""
    return method_of_key(key).exact


def space_method(space_choice: str) -> Method | None:
    """The method a space file's `choices` entry belongs to (None: unknown)."""
    return next((m for m in _REGISTRY.values() if space_choice in m.space_choices), None)


def space_choices() -> tuple[str, ...]:
    """Every `choices` entry a space file may use, in registration order."""
    return tuple(c for m in _REGISTRY.values() for c in m.space_choices)


def method_of_layer(module: nn.Module) -> Method | None:
    """The method whose `build` made `module` (by its class), or None."""
    return next((m for m in _REGISTRY.values() if isinstance(module, m.layer_types)), None) \
        if module is not None else None


def flop_formulas() -> dict:
    """Every method's FLOP formulas (aten op -> formula), for the cost model's counter."""
    out: dict = {}
    for m in _REGISTRY.values():
        out.update(m.flop_formulas)
    return out


def check_ranks(kind: str, ranks) -> tuple[int, ...]:
    """ASI ranks as a tuple of ints, each in [1, MAX_RANK] (PlanError otherwise)."""
    if not ranks:
        raise PlanError(f"an {kind} choice needs ranks (one int per input mode)")
    try:
        out = tuple(int(r) for r in ranks)
    except (TypeError, ValueError) as e:
        raise PlanError(f"asi ranks must be whole numbers, got {ranks!r}") from e
    if any(r < 1 for r in out):
        raise PlanError(f"asi ranks must be >= 1, got {out}")
    if any(r > MAX_RANK for r in out):
        raise PlanError(f"asi ranks must be at most {MAX_RANK}, got {out}")
    return out


def level_key(level: float, keep_batch: bool = False) -> str:
    """'asi@0.9', or with the batch mode kept whole 'asi@0.9:b'."""
    return f"asi@{float(level):g}" + (KEEP_BATCH if keep_batch else "")


def level_code(level: float, keep_batch: bool = False) -> str:
    """ASI's short code of a level: '.9', '.95b' (a level of 1 is '1')."""
    return f"{float(level):g}".lstrip("0") + ("b" if keep_batch else "")
