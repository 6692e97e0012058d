"""frozen: the layer gets no gradient (a frozen layer inside the trained region passes the
gradient on to its input only: the plan's lean companions). The default of every layer a plan
does not list. Plan `frozen`, search key `frozen`, code `-`."""

from __future__ import annotations

from autorank.methods.base import Method, register_method


class Frozen(Method):
    name = "frozen"
    summary = "no gradient for the weight (the default of a layer a plan does not list)"
    trains = False
    exact = True
    space_choices = ("frozen",)
    notation = "frozen"

    def code(self, key: str) -> str:
        return "-"


FROZEN = register_method(Frozen())
