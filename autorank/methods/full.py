"""full: plain backpropagation; the layer is left as it is, its weight trained (autograd keeps
its whole input). Plan `full`, search key `full`, code `F`."""

from __future__ import annotations

from autorank.methods.base import Method, register_method


class Full(Method):
    name = "full"
    summary = "plain backpropagation (the whole input kept for the weight gradient)"
    space_choices = ("full",)
    exact = True
    notation = "full"

    def code(self, key: str) -> str:
        return "F"


FULL = register_method(Full())
