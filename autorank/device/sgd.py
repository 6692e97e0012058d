"""SGD with momentum for the device runner, in place and nothing more.

torch.optim.SGD computes the same update, but constructing any torch.optim optimizer imports
torch._dynamo and, with it, sympy and mpmath: about 800 modules and 66 MB of resident memory
(measured on x86, torch 2.13 and 2.14) for the whole run, a tenth of what a 1 GB board leaves a
training process. This class keeps torch.optim.SGD's update (dampening 0, no Nesterov, weight
decay folded into the gradient) and its zero_grad(set_to_none=True); tests/test_device_data.py
checks it against torch.optim.SGD step by step.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class SGD:
    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        self.params = [p for p in params]
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None:
                continue
            if self.weight_decay:
                g = g.add(p, alpha=self.weight_decay)
            if self.momentum:
                buf = self.buffers[i]
                if buf is None:  # torch.optim.SGD: the first step's buffer is the gradient
                    buf = self.buffers[i] = g.detach().clone()
                else:
                    buf.mul_(self.momentum).add_(g)
                g = buf
            p.add_(g, alpha=-self.lr)
