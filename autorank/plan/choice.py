"""One layer's training choice in a plan: frozen, full, asi[ranks], hosvd[eps], lora[r] or
lora[r]+asi[ranks] (no imports
beyond the standard library and autorank.errors: the plan file's vocabulary)."""

from __future__ import annotations

import dataclasses
import re

from autorank.errors import PlanError

KINDS = ("frozen", "full", "asi", "hosvd", "lora")

MAX_RANK = 2**31 - 1  # a rank is a size of one tensor dimension; apply_plan checks it against the layer
_CHOICE_RE = re.compile(r"^(frozen|full|asi|hosvd)(?:\[([^\]]*)\])?$")
_LORA_RE = re.compile(r"^lora\[([^\]]*)\](?:\+asi\[([^\]]*)\])?$")


@dataclasses.dataclass(frozen=True)
class Choice:
    """What one conv/linear layer does in training: `frozen`, `full` (plain backprop), `asi`
    with one rank per input mode, `hosvd` with an explained-variance level eps, or `lora` (a
    linear layer only) with a LoRA rank, the weight frozen, and, with `ranks`, LoRA + ASI: the
    input A needs for its gradient kept at those ASI ranks (autorank.shortcut.LoRALinear)."""

    kind: str
    ranks: tuple[int, ...] | None = None
    eps: float | None = None
    rank: int | None = None  # the LoRA rank

    def __post_init__(self):
        if self.kind not in KINDS:
            raise PlanError(f"unknown choice kind {self.kind!r}; expected one of {KINDS}")
        if self.kind == "asi" or (self.kind == "lora" and self.ranks is not None):
            if not self.ranks:
                raise PlanError(f"an {self.kind} choice needs ranks (one int per input mode)")
            try:
                ranks = tuple(int(r) for r in self.ranks)
            except (TypeError, ValueError) as e:
                raise PlanError(f"asi ranks must be whole numbers, got {self.ranks!r}") from e
            if any(r < 1 for r in ranks):
                raise PlanError(f"asi ranks must be >= 1, got {ranks}")
            if any(r > MAX_RANK for r in ranks):
                raise PlanError(f"asi ranks must be at most {MAX_RANK}, got {ranks}")
            object.__setattr__(self, "ranks", ranks)
        elif self.ranks is not None:
            raise PlanError(f"a {self.kind} choice takes no ranks")
        if self.kind == "lora":
            try:
                rank = int(self.rank) if self.rank is not None else 0
            except (TypeError, ValueError):
                rank = 0
            if rank < 1:
                raise PlanError(f"a lora choice needs a rank >= 1, got {self.rank!r}")
            if rank > MAX_RANK:
                raise PlanError(f"a lora rank must be at most {MAX_RANK}, got {rank}")
            object.__setattr__(self, "rank", rank)
        elif self.rank is not None:
            raise PlanError(f"a {self.kind} choice takes no LoRA rank")
        if self.kind == "hosvd":
            try:
                eps = float(self.eps) if self.eps is not None else float("nan")
            except (TypeError, ValueError):
                eps = float("nan")
            if not 0.0 < eps <= 1.0:
                raise PlanError(f"a hosvd choice needs eps in (0, 1], got {self.eps!r}")
            object.__setattr__(self, "eps", eps)
        elif self.eps is not None:
            raise PlanError(f"a {self.kind} choice takes no eps")

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

    @property
    def trained(self) -> bool:
        return self.kind != "frozen"

    def __str__(self) -> str:
        if self.kind == "asi":
            return "asi[" + ",".join(str(r) for r in self.ranks) + "]"
        if self.kind == "hosvd":
            return f"hosvd[{self.eps:g}]"
        if self.kind == "lora":
            asi = "" if self.ranks is None else "+asi[" + ",".join(str(r) for r in self.ranks) + "]"
            return f"lora[{self.rank}]{asi}"
        return self.kind

    @classmethod
    def parse(cls, text: str) -> Choice:
        """Inverse of str(): 'frozen', 'full', 'asi[8,64,4,4]', 'hosvd[0.8]', 'lora[8]',
        'lora[8]+asi[8,64,32]'."""
        lora = _LORA_RE.match(str(text).replace(" ", ""))
        if lora is not None:
            rank, asi = lora.groups()
            if not rank.isdigit():
                raise PlanError(f"cannot parse choice {text!r}: lora needs one rank, e.g. lora[8]")
            if len(rank) > len(str(MAX_RANK)):
                raise PlanError(f"cannot parse choice {str(text)[:40]!r}: a lora rank must be at most {MAX_RANK}")
            if asi is not None and not asi:
                raise PlanError(f"cannot parse choice {text!r}: +asi needs ranks, e.g. lora[8]+asi[8,64,32]")
            try:
                asi_ranks = None if asi is None else [int(r) for r in asi.split(",")]
            except ValueError as e:
                raise PlanError(f"cannot parse choice {text!r}: +asi ranks are whole numbers >= 1") from e
            return cls.lora(int(rank), asi_ranks)
        m = _CHOICE_RE.match(str(text).replace(" ", ""))
        if m is None:
            raise PlanError(f"cannot parse choice {text!r}; expected frozen, full, asi[r,...], hosvd[eps], "
                            "lora[r] or lora[r]+asi[r,...]")
        kind, arg = m.groups()
        if kind == "asi":
            if not arg:
                raise PlanError(f"cannot parse choice {text!r}: asi needs ranks, e.g. asi[8,64,4,4]")
            try:
                ranks = [int(r) for r in arg.split(",")]
            except ValueError as e:
                raise PlanError(f"cannot parse choice {text!r}: asi ranks are whole numbers >= 1, "
                                "e.g. asi[8,64,4,4]") from e
            return cls.asi(ranks)
        if kind == "hosvd":
            if not arg:
                raise PlanError(f"cannot parse choice {text!r}: hosvd needs eps, e.g. hosvd[0.8]")
            try:
                eps = float(arg)
            except ValueError as e:
                raise PlanError(f"cannot parse choice {text!r}: hosvd needs eps in (0, 1], "
                                "e.g. hosvd[0.8]") from e
            return cls.hosvd(eps)
        if arg:
            raise PlanError(f"cannot parse choice {text!r}: {kind} takes no argument")
        return cls(kind)
