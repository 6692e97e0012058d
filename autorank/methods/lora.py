"""lora: LoRA beside the frozen weight of a linear layer, y = W x + alpha/r B A x (A, B trained),
and LoRA + ASI: A's input kept in Tucker form at ASI ranks (autorank.shortcut.LoRALinear).

Plan `lora[8]` / `lora[8]+asi[8,64,32]`; search keys `lora@<rank>` and
`lora@<rank>+asi@<level>` (space choices `lora` and `lora_asi`, per rank of the space's
`lora_ranks`); codes `L4`, `L4.9`. Saved bytes: the layer is traced op by op (its input storage
may be shared with the block's other projections); FLOPs: its ops as they run (and ASI's QR).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping, Sequence

from torch import nn

from autorank import shortcut
from autorank.errors import ConfigError, PlanError
from autorank.methods.asi import parse_level, parse_ranks
from autorank.methods.base import MAX_RANK, Choice, KeyInfo, Method, check_ranks, level_code, level_key, register_method

_RE = re.compile(r"^lora\[([^\]]*)\](?:\+asi\[([^\]]*)\])?$")


def lora_key(rank: int, level: float | None = None) -> str:
    """'lora@4', or with an ASI level 'lora@4+asi@0.9'."""
    return f"lora@{int(rank)}" + ("" if level is None else "+" + level_key(level))


def parse_lora_key(key: str) -> tuple[int, float | None]:
    """'lora@4' -> (4, None); 'lora@4+asi@0.9' -> (4, 0.9)."""
    rank, _, asi = key.removeprefix("lora@").partition("+")
    if not key.startswith("lora@") or not rank.isdigit() or int(rank) < 1 or (asi and not asi.startswith("asi@")):
        raise ConfigError(f"unknown choice {key!r}: expected lora@<rank> or lora@<rank>+asi@<level>")
    level = parse_level(asi) if asi else None
    if level is not None and level.keep_batch:
        raise ConfigError(f"unknown choice {key!r}: lora's +asi takes a level without :b")
    return int(rank), (None if level is None else level.level)


class LoRA(Method):
    name = "lora"
    summary = "LoRA beside the frozen weight (linear layers); with +asi, A's input in Tucker form"
    fields = ("rank", "ranks")
    space_choices = ("lora", "lora_asi")
    layer_types = (shortcut.LoRALinear,)
    notation = "lora[r], lora[r]+asi[r,...]"

    def validate(self, choice: Choice) -> dict:
        try:
            rank = int(choice.rank) if choice.rank is not None else 0
        except (TypeError, ValueError):
            rank = 0
        if rank < 1:
            raise PlanError(f"a lora choice needs a rank >= 1, got {choice.rank!r}")
        if rank > MAX_RANK:
            raise PlanError(f"a lora rank must be at most {MAX_RANK}, got {rank}")
        return {"rank": rank, "ranks": None if choice.ranks is None else check_ranks(self.name, choice.ranks)}

    def format(self, choice: Choice) -> str:
        asi = "" if choice.ranks is None else "+asi[" + ",".join(str(r) for r in choice.ranks) + "]"
        return f"lora[{choice.rank}]{asi}"

    def parse(self, text: str) -> Choice | None:
        m = _RE.match(text)
        if m is None:
            return None
        rank, asi = m.groups()
        if not rank.isdigit():
            raise PlanError(f"cannot parse choice {text!r}: lora needs one rank, e.g. lora[8]")
        if len(rank) > len(str(MAX_RANK)):
            raise PlanError(f"cannot parse choice {text[:40]!r}: a lora rank must be at most {MAX_RANK}")
        if asi is not None and not asi:
            raise PlanError(f"cannot parse choice {text!r}: +asi needs ranks, e.g. lora[8]+asi[8,64,32]")
        try:
            asi_ranks = None if asi is None else [int(r) for r in asi.split(",")]
        except ValueError as e:
            raise PlanError(f"cannot parse choice {text!r}: +asi ranks are whole numbers >= 1") from e
        return Choice.lora(int(rank), asi_ranks)

    def expand(self, space_choice: str, space) -> list[str]:
        if space_choice == "lora":
            return [lora_key(r) for r in space.lora_ranks]
        return [lora_key(r, lv) for r in space.lora_ranks for lv in space.levels]

    def parse_key(self, key: str) -> KeyInfo | None:
        if not key.startswith("lora@"):
            return None
        rank, level = parse_lora_key(key)
        return KeyInfo("lora", level=level, rank=rank)

    def key_choice(self, key: str, ranks: Mapping[str, Sequence[int]]) -> Choice:
        rank, level = parse_lora_key(key)
        return Choice.lora(rank, None if level is None else ranks[key])

    def code(self, key: str) -> str:
        rank, level = parse_lora_key(key)
        return f"L{rank}" + ("" if level is None else level_code(level))

    def check(self, module: nn.Module, choice: Choice, name: str) -> None:
        if not isinstance(module, nn.Linear):
            raise PlanError(f"plan layer {name!r}: a lora choice needs a linear layer, it is {type(module).__name__}")
        most = max(module.in_features, module.out_features)
        if choice.rank > most:
            raise PlanError(f"plan layer {name!r}: lora rank {choice.rank} is above the layer's larger "
                            f"dimension ({module.in_features} in, {module.out_features} out): "
                            f"use a rank of at most {most}")
        if choice.ranks is not None and len(choice.ranks) < 2:
            raise PlanError(f"plan layer {name!r}: {choice} gives {len(choice.ranks)} ASI ranks, the layer needs "
                            "at least 2 (batch, ..., features)")

    def build(self, module: nn.Module, choice: Choice, name: str) -> nn.Module:
        module.requires_grad_(False)  # the base weight stays frozen; A and B train
        # A's start is drawn from the layer's name: the same plan gives the same model anywhere
        return shortcut.LoRALinear(module, choice.rank, asi_ranks=choice.ranks, seed=zlib.crc32(name.encode()))


LORA_METHOD = register_method(LoRA())
