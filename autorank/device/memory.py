"""The device process's memory: the allocator policy the runner sets, its resident memory sampled
while it trains, and the memory it may use (a cgroup's limit, else what the kernel says is
available). Standard library only: the supervisor (autorank.device.guard) uses it without torch.

Figures are bytes; "MB" in messages is MiB (2**20 bytes), as everywhere in autorank.

Why not psutil: it is not a dependency of the device install (torch + pyyaml), and what we read is
three lines of /proc/self/status.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from dataclasses import dataclass
from pathlib import Path

MB = 2**20

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

# Blocks of 64 KiB and more come from mmap and go back to the kernel when freed. glibc's default
# threshold adapts upwards to the largest block freed (up to 32 MiB on 64-bit), after which freed
# activations stay in the heap: the process kept 300-500 MB more than the live tensors
# (docs/DEVICE.md, "The allocator").
MMAP_THRESHOLD_BYTES = 64 * 1024


def set_allocator_policy(mmap_threshold: int = MMAP_THRESHOLD_BYTES) -> str:
    """Make glibc return freed blocks of `mmap_threshold` bytes and more to the kernel at once
    (mallopt through ctypes; fixes the threshold, so it no longer grows). Returns what was set,
    or why nothing was (not glibc: musl and macOS allocators return large blocks already)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return "allocator: not glibc, left as it is"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    ok &= mallopt(M_TRIM_THRESHOLD, int(mmap_threshold)) == 1
    if not ok:
        return "allocator: glibc refused mallopt, left as it is"
    return f"allocator: glibc, blocks >= {mmap_threshold // 1024} KiB mmapped and returned when freed"


def read_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, RssShmem and VmHWM of a process, in bytes (0 where not reported)."""
    out = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "RssShmem": 0, "VmHWM": 0}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in out:
            out[key] = int(value.split()[0]) * 1024  # kB
    return out


@dataclass
class Peaks:
    """Highest sampled resident memory (bytes): rss = anon + file + shmem; hwm is the kernel's
    own high-water mark of rss (VmHWM), which no sampling interval can miss."""

    rss: int = 0
    anon: int = 0
    file: int = 0
    hwm: int = 0

    def line(self) -> str:
        return (f"RSS {self.rss / MB:.0f} MB (kernel high-water mark {self.hwm / MB:.0f} MB), "
                f"anonymous {self.anon / MB:.0f} MB, file-backed {self.file / MB:.0f} MB")


class PeakSampler:
    """Samples /proc/self/status every `interval_s` in a thread while the block runs (torch's
    kernels release the GIL, so the thread runs during a step). Use as a context manager;
    `peaks` holds the highest figures seen, `reset()` starts a new phase."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.peaks = Peaks()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> dict[str, int]:
        s = read_status()
        p = self.peaks
        p.rss, p.anon, p.file = max(p.rss, s["VmRSS"]), max(p.anon, s["RssAnon"]), max(p.file, s["RssFile"])
        p.hwm = max(p.hwm, s["VmHWM"])
        return s

    def reset(self) -> None:
        self.peaks = Peaks()
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> "PeakSampler":
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="autorank-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()


def cgroup_paths() -> list[tuple[str, Path]]:
    """(version, folder) of this process's memory cgroup, innermost first, then its ancestors."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if "memory" in controllers.split(","):
            top, version = Path("/sys/fs/cgroup/memory"), "v1"
        elif controllers == "":
            top, version = Path("/sys/fs/cgroup"), "v2"
        else:
            continue
        rel_path = Path(rel.lstrip("/"))
        for parent in [rel_path, *rel_path.parents]:
            out.append((version, top / parent))
    return out


def cgroup_limit() -> tuple[int, str] | None:
    """The tightest memory limit of this process's cgroups (v1 memory.limit_in_bytes, v2
    memory.max), with the file it came from; None when no finite limit is set."""
    best = None
    for version, folder in cgroup_paths():
        f = folder / ("memory.limit_in_bytes" if version == "v1" else "memory.max")
        try:
            text = f.read_text().strip()
        except OSError:
            continue
        if text == "max" or not text.isdigit() or int(text) >= 2**62:
            continue
        if best is None or int(text) < best[0]:
            best = (int(text), str(f))
    return best


def mem_available() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (the kernel's estimate of what new allocations can
    get without swapping), or None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_allowed() -> tuple[int, str] | None:
    """What this process may hold at its peak, with where the figure comes from: a cgroup's limit,
    else MemAvailable plus what the process holds already (that is its own, not to be found
    again). None when neither can be read (not Linux)."""
    limit = cgroup_limit()
    if limit is not None:
        return limit[0], f"the memory cgroup's limit ({limit[1]})"
    avail = mem_available()
    if avail is None:
        return None
    held = read_status()["VmRSS"]
    return avail + held, "MemAvailable in /proc/meminfo plus this process's resident memory"

