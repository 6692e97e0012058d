#!/usr/bin/env python3
"""Peak memory of a command, read from /proc/<pid>/status (stdlib only, Linux).

    autorank-bench proc-peak [--json OUT] [--interval S] [--qemu] [--subtract BASE.json] -- CMD ARG...

Samples /proc/<pid>/status of the command and of its descendants every 20 ms and reports, in MB
(2**20 bytes): the peaks of VmRSS, RssAnon, RssFile and RssShmem summed over the process tree
(pages shared after a fork count once per process), the largest VmRSS and VmHWM of one process,
ru_maxrss from wait4 (the kernel's peak of the command and its reaped descendants, which no
sampling interval misses, but which also counts this script's forked copy before the exec: never
below ~15 MB), the wall time and the exit status. The JSON goes to stderr (the command's stdout
stays its own) and, with --json, to OUT. The exit status is the command's (128+N for signal N).

Under qemu-user (`qemu-aarch64-static -L ROOT ROOT/usr/bin/python3.11 ...`) the process measured
is the emulator, whose memory holds the guest's. The emulator's own share is not constant: its
translated-code buffer grows with the guest code run (about 18 MB for an empty interpreter, 127 MB
after `import torch`) and its heap with it (3 -> 23 MB), so subtracting an empty interpreter's
figures (--subtract BASE.json, per field) overstates a torch program by ~130 MB. --qemu instead
reads /proc/<pid>/smaps of each qemu process at every sample (a few ms each: consider
--interval 0.05) and subtracts the emulator's own mappings at that moment (the anonymous executable
code buffer, the emulator's brk heap, the qemu binary itself), giving peak_guest_* fields. What
it cannot tell apart (the emulator's malloc'd mmaps, its host thread stacks; ~8 MB with torch
loaded) stays in, so the guest figures are upper bounds by about that much; compared with the
guest's own /proc/self/maps they were within 8 MB (221 vs 229 MB) after importing torch.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")
MB = 2**20


def _status(pid: int) -> dict[str, int] | None:
    """The kB fields of /proc/<pid>/status in bytes; None when the process is gone (or a zombie)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            text = f.read().decode("ascii", "replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[key] = int(parts[0]) * 1024
    return out if "VmRSS" in out else None


def _children(pid: int) -> list[int]:
    """Direct children of pid, from /proc/<pid>/task/*/children (CONFIG_PROC_CHILDREN), else a scan."""
    kids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    try:
        for tid in tasks:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(x) for x in f.read().split()]
        return kids
    except FileNotFoundError:
        pass
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                kids.append(int(name))
    return kids


def _is_qemu(pid: int) -> bool | None:
    """Whether pid runs a qemu-user emulator; None when it is gone."""
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe")).startswith("qemu-")
    except OSError:
        return None


def _qemu_own(pid: int) -> dict[str, int] | None:
    """Bytes of a qemu-user process's own mappings (its code buffer, brk heap and binary): VmRSS,
    RssAnon and RssFile; None when they cannot be read (the process is gone or exiting)."""
    own = {"VmRSS": 0, "RssAnon": 0}
    mine = False
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split(None, 5)
                if "-" in head[0] and not head[0].endswith(":"):  # a mapping's header line
                    name = head[5].strip() if len(head) > 5 else ""
                    mine = name == "[heap]" or name == exe or (name == "" and "x" in head[1])
                elif mine and head[0] == "Rss:":
                    own["VmRSS"] += int(head[1]) * 1024
                elif mine and head[0] == "Anonymous:":
                    own["RssAnon"] += int(head[1]) * 1024
    except (OSError, IndexError, ValueError):
        return None
    if not own["VmRSS"]:  # an exiting process: its mappings are already gone
        return None
    own["RssFile"] = own["VmRSS"] - own["RssAnon"]
    return own


def _tree(root: int) -> list[int]:
    seen, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.append(pid)
            todo += _children(pid)
    return seen


def measure(cmd: list[str], interval: float = 0.02, qemu: bool = False) -> dict:
    peaks = {f: 0 for f in FIELDS}
    guest_fields = ("VmRSS", "RssAnon", "RssFile")
    guest_peaks = {f: 0 for f in guest_fields}
    qemu_seen = 0
    own_peak: dict[int, int] = {}  # per qemu pid: the largest own share seen
    single = 0  # the largest VmRSS of one process (the sums count pages shared after a fork twice)
    hwm = 0
    samples = 0
    nprocs = 0
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd)
    forward = lambda sig, _frame: proc.send_signal(sig)  # noqa: E731
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            # waitpid WNOHANG first: a reaped pid's /proc entry is gone, an unreaped zombie has no Vm*
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            total = {f: 0 for f in FIELDS}
            guest: dict[str, int] | None = {f: 0 for f in guest_fields}
            pids = _tree(proc.pid)
            nprocs = max(nprocs, len(pids))
            for p in pids:
                is_qemu = _is_qemu(p) if qemu else False
                st = _status(p) if is_qemu is not None else None
                if st is None:
                    continue
                for f in FIELDS:
                    total[f] += st.get(f, 0)
                hwm = max(hwm, st.get("VmHWM", 0))
                single = max(single, st["VmRSS"])
                own = _qemu_own(p) if is_qemu else None
                if own is not None:
                    # an exiting emulator unmaps its code buffer while its status still counts it
                    if own["VmRSS"] < own_peak.get(p, 0) // 2:
                        own = None
                    else:
                        own_peak[p] = max(own_peak.get(p, 0), own["VmRSS"])
                if is_qemu and own is None:
                    guest = None  # this sample cannot tell the guest's share
                elif guest is not None:
                    qemu_seen += bool(is_qemu)
                    for f in guest_fields:
                        guest[f] += st.get(f, 0) - (own[f] if own else 0)
            for f in FIELDS:
                peaks[f] = max(peaks[f], total[f])
            for f in guest_fields:
                if guest is not None:
                    guest_peaks[f] = max(guest_peaks[f], guest[f])
            samples += 1
            time.sleep(interval)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    wall = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
    result = {f"peak_{f}_MB": round(peaks[f] / MB, 1) for f in FIELDS}
    if qemu:
        if not qemu_seen:
            print("device_peak: --qemu, but no qemu process was sampled", file=sys.stderr)
        result.update({f"peak_guest_{f}_MB": round(guest_peaks[f] / MB, 1) for f in guest_fields})
    result.update(
        peak_single_process_VmRSS_MB=round(single / MB, 1),
        VmHWM_MB=round(hwm / MB, 1),
        ru_maxrss_MB=round(rusage.ru_maxrss * 1024 / MB, 1),  # kB on Linux
        wall_s=round(wall, 3),
        exit_status=code,
        samples=samples,
        max_processes=nprocs,
        interval_s=interval,
        command=cmd,
    )
    return result


def subtract(result: dict, base: dict) -> dict:
    """Per-field result minus baseline for the *_MB fields, under `minus_baseline`."""
    return {k: round(v - base[k], 1) for k, v in result.items() if k.endswith("_MB") and k in base}


def main(argv=None, prog=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", metavar="OUT", help="also write the JSON here")
    ap.add_argument("--interval", type=float, default=0.02, help="seconds between samples (0.02)")
    ap.add_argument("--subtract", metavar="BASE.json", help="a baseline run's JSON (e.g. an empty guest interpreter)")
    ap.add_argument("--qemu", action="store_true",
                    help="also peak_guest_*: the tree's figures less each qemu-user process's own mappings (from smaps)")
    i = argv.index("--") if "--" in argv else len(argv)
    args = ap.parse_args(argv[:i])
    cmd = argv[i + 1 :]
    if not cmd:
        ap.error("no command to measure: give it after --, e.g. -- python3 -c pass")
    result = measure(cmd, args.interval, args.qemu)
    if args.subtract:
        with open(args.subtract) as f:
            base = json.load(f)
        result["minus_baseline"] = subtract(result, base)
        result["baseline"] = args.subtract
    text = json.dumps(result, indent=1)
    print(text, file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return result["exit_status"]


if __name__ == "__main__":  # stdlib only: runs with any python3, e.g. outside the venv
    sys.exit(main())
