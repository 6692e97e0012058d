"""One module's training choice in a plan: the plan file's vocabulary. Each method owns its
notation (frozen, full, asi[ranks], hosvd[eps], lora[r], lora[r]+asi[ranks], recompute):
autorank.methods; `Choice` and the registered kinds are re-exported here."""

from __future__ import annotations

from autorank.methods import MAX_RANK, Choice, kinds

KINDS = kinds()

__all__ = ["Choice", "KINDS", "MAX_RANK"]
