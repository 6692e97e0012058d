"""Rehearse a device's memory limit on a bigger Linux machine: run a command in a memory cgroup
capped at LIMIT MiB and report how it ended and the cgroup's peak usage.

    python -m autorank.device.cap 700 -- autorank-device plan.yaml ckpt.pt data.pt

The cgroup is a child of this process's own memory cgroup (cgroup v1: memory.limit_in_bytes, and
memory.memsw.limit_in_bytes where swap accounting exists, so the limit cannot be dodged by
swapping; cgroup v2: memory.max and memory.swap.max = 0), made for the run and removed after it.
Needs the right to make a child cgroup there (root, or a delegated v2 subtree). Like a device's
RAM, the cap counts every page the process touches: anonymous memory and the page cache of the
files it reads (the kernel drops clean file pages before it kills). RLIMIT_AS (ulimit -v) would
be no substitute: torch reserves far more address space than it ever touches.

Standard library only. Exit status: the command's own, or 137 when the kernel killed it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from autorank.device.memory import MB, cgroup_paths


class CgroupUnavailable(RuntimeError):
    """No memory cgroup can be made here (no cgroupfs, no permission)."""


@dataclass
class CapResult:
    limit_bytes: int
    returncode: int
    killed: bool
    peak_bytes: int  # the cgroup's high-water mark: anonymous + page cache charged to it
    oom_kills: int
    wall_s: float
    version: str
    stdout: str | bytes | None = None
    stderr: str | bytes | None = None


class MemoryCap:
    """A child memory cgroup with a limit; `run(argv)` starts a command inside it."""

    def __init__(self, limit_bytes: int, name: str | None = None) -> None:
        paths = cgroup_paths()
        if not paths:
            raise CgroupUnavailable("no memory cgroup in /proc/self/cgroup (not Linux, or no memory controller)")
        self.version, own = paths[0]
        self.limit_bytes = int(limit_bytes)
        self.path = own / (name or f"autorank-cap-{os.getpid()}-{time.monotonic_ns()}")
        try:
            self.path.mkdir()
        except OSError as e:
            raise CgroupUnavailable(f"cannot make the memory cgroup {self.path}: {e} (needs root or a "
                                    "delegated cgroup)") from e
        try:
            self._set_limit()
        except OSError as e:
            self.remove()
            raise CgroupUnavailable(f"cannot set a memory limit in {self.path}: {e}") from e

    def _write(self, name: str, value) -> None:
        (self.path / name).write_text(str(value))

    def _set_limit(self) -> None:
        if self.version == "v1":
            self._write("memory.limit_in_bytes", self.limit_bytes)
            if (self.path / "memory.memsw.limit_in_bytes").exists():
                self._write("memory.memsw.limit_in_bytes", self.limit_bytes)
        else:
            self._write("memory.max", self.limit_bytes)
            if (self.path / "memory.swap.max").exists():
                self._write("memory.swap.max", 0)

    def join(self) -> None:
        """Move the calling process into the cgroup (a preexec_fn: runs between fork and exec)."""
        name = "cgroup.procs" if self.version == "v2" else "tasks"
        (self.path / name).write_text(str(os.getpid()))

    def peak_bytes(self) -> int:
        for name in ("memory.max_usage_in_bytes", "memory.peak"):
            f = self.path / name
            if f.exists():
                return int(f.read_text().split()[0])
        return 0

    def oom_kills(self) -> int:
        for name in ("memory.oom_control", "memory.events"):
            f = self.path / name
            if f.exists():
                for line in f.read_text().splitlines():
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        return 0

    def run(self, argv: list[str], **kwargs) -> CapResult:
        """subprocess.run(argv, **kwargs) inside the cgroup; its output in the result."""
        t0 = time.perf_counter()
        proc = subprocess.run(argv, preexec_fn=self.join, **kwargs)
        rc = proc.returncode
        return CapResult(self.limit_bytes, rc, rc in (-9, 137), self.peak_bytes(), self.oom_kills(),
                         time.perf_counter() - t0, self.version, proc.stdout, proc.stderr)

    def remove(self) -> None:
        for _ in range(50):  # the last task may take a moment to leave
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)

    def __enter__(self) -> "MemoryCap":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def run_capped(limit_bytes: int, argv: list[str], **popen) -> CapResult:
    with MemoryCap(limit_bytes) as cap:
        return cap.run(argv, **popen)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m autorank.device.cap",
                                 description="Run a command under a memory cgroup limit (MiB).")
    ap.add_argument("limit_mb", type=float)
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    ap.add_argument("--json", default=None, help="also write the result here as JSON")
    a = ap.parse_args(argv)
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd or a.limit_mb <= 0:
        ap.error("give a limit > 0 and a command after --")
    try:
        res = run_capped(int(a.limit_mb * MB), cmd)
    except CgroupUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    how = "killed by the kernel (out of memory)" if res.killed else f"exit status {res.returncode}"
    print(f"cap {a.limit_mb:g} MB ({res.version}): {how}; cgroup peak {res.peak_bytes / MB:.0f} MB, "
          f"{res.oom_kills} OOM kill(s), {res.wall_s:.1f} s", file=sys.stderr)
    if a.json:
        Path(a.json).write_text(json.dumps(asdict(res)))
    return 137 if res.killed else (res.returncode if res.returncode >= 0 else 128 - res.returncode)


if __name__ == "__main__":
    sys.exit(main())
