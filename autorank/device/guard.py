"""autorank-device's entry point: the runner works in a child process, and this one, which
imports nothing but the standard library (about 10 MB), reports how it ended. A process the
kernel kills for want of memory (the OOM killer, a cgroup's limit) gets SIGKILL and cannot say a
word itself; here that becomes one line naming the phase and the figures, and exit status 4.

Set AUTORANK_DEVICE_CHILD=1 to run the runner in this process (no supervisor), e.g. where a child
process cannot be started the same way (qemu-user without binfmt handlers).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from autorank.device.status import ENV, read_phase

CHILD_ENV = "AUTORANK_DEVICE_CHILD"
EXIT_OUT_OF_MEMORY = 4  # as autorank.device.runner
MB = 2**20


def _in_process(argv: list[str]) -> int:
    try:  # Ctrl-C while torch is imported, too, is one line (the runner handles it after)
        from autorank.device.runner import main as run_main

        return run_main(argv)
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C): nothing was saved", file=sys.stderr)
        return 130


def killed_line(phase: dict) -> str:
    """The one line for a runner the kernel killed, from what it recorded before."""
    what = phase.get("phase", "start-up")
    line = f"error: the kernel killed the training process (SIGKILL) during {what}: out of memory"
    predicted, allowed = phase.get("predicted_bytes"), phase.get("allowed")
    if predicted:
        line += f"; predicted process peak {predicted / MB:.0f} MB"
    if allowed:
        line += f", memory this process may use {allowed[0] / MB:.0f} MB ({allowed[1]})"
    return line + ": export a plan for a smaller budget or free memory"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if os.environ.get(CHILD_ENV) == "1" or any(a in ("-h", "--help") for a in argv):
        return _in_process(argv)
    with tempfile.TemporaryDirectory(prefix="autorank-device-") as tmp:
        status = Path(tmp) / "status.json"
        env = {**os.environ, CHILD_ENV: "1", ENV: str(status)}
        try:
            proc = subprocess.Popen([sys.executable, "-m", "autorank.device", *argv], env=env)
        except OSError:  # cannot start a child interpreter here: run in this process
            return _in_process(argv)
        while True:
            try:
                rc = proc.wait()
                break
            except KeyboardInterrupt:  # the child has the same SIGINT (one process group): let it finish
                continue
        if rc == -signal.SIGKILL:
            print(killed_line(read_phase(status)), file=sys.stderr)
            return EXIT_OUT_OF_MEMORY
        if rc < 0:
            name = signal.Signals(-rc).name
            print(f"error: the training process ended by signal {name}", file=sys.stderr)
            return 128 - rc
        return rc
