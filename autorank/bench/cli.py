"""`autorank-bench NAME [options]`: one entry point for the benchmarks and checks.

Each command is a module of autorank.bench with `main(argv, prog)`; `autorank-bench NAME -h`
prints its options. The module is imported only when its command runs (some need the search
stack, `peak --device cuda` a GPU, `proc-peak` nothing but the standard library).
"""

from __future__ import annotations

import importlib
import sys

# name -> (module of autorank.bench, one line): the order is the order of the listing
COMMANDS = {
    "layers": ("layers", "conv/linear layers: plain vs ASI vs HOSVD_eps vs checkpointing (time, saved bytes, FLOPs)"),
    "transformer-layers": ("transformer_layers", "transformer linear layers: plain vs ASI vs LoRA vs LoRA + ASI"),
    "layout": ("layout", "a training step in the default layout vs channels-last"),
    "peak": ("peak", "predicted peak training memory against a real step (--device cpu|cuda)"),
    "starts": ("starts", "the search's predicted peaks of plain plans by where the trained region starts"),
    "workload": ("workload", "a workload: pretraining, whether plain backprop fits, one trial, the feature cache"),
    "fidelity": ("fidelity", "accuracy against steps, lr and seed for plans of a workload (trial fidelity)"),
    "methods": ("methods", "transformers at equal budget: plain vs ASI vs LoRA vs LoRA + ASI on the last k blocks"),
    "planners": ("planners", "does the search pay: head, plain, knapsack, uniform ASI and the samplers at equal cost"),
    "device-memory": ("device_memory", "a run's plans trained by autorank-device: predicted against measured process peaks"),
    "proc-peak": ("procpeak", "peak memory of any command, from /proc (qemu-user aware)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {line}" for name, (_, line) in COMMANDS.items()]
    return ("usage: autorank-bench NAME [options]   (autorank-bench NAME -h: its options)\n\ncommands:\n"
            + "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"autorank-bench: error: unknown command {name!r}: use one of {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(f"autorank.bench.{COMMANDS[name][0]}")
    return int(module.main(rest, prog=f"autorank-bench {name}") or 0)
