"""Predicted against measured process peaks of the device runner, plan by plan, as a device runs it.

    autorank-bench device-memory RUN_DIR [--python CMD] [--cap-mb MB] [--epochs 1] [--json OUT]

RUN_DIR is a run folder of `python -m autorank` (plan.yaml, references/*.yaml, device_data.pt);
the checkpoint is the one the plan's run used (--checkpoint, else read from the run's log line
"autorank-device PLAN CHECKPOINT DATA"). Each plan is trained by `autorank-device` in a fresh
process (--python: the interpreter command, e.g. ".venv/bin/python" or "qemu-aarch64-static -L
ROOT ROOT/usr/bin/python3.11"; the supervisor is skipped with AUTORANK_DEVICE_CHILD=1 so that the
measured process is the runner itself), and its resident memory is sampled from outside every 20 ms
(/proc/PID/status, autorank.device.memory.read_status). With --cap-mb each plan also runs under a memory cgroup of
that size (autorank.device.cap) and the table says how it ended.

Prints a markdown table: plan, predicted tensor peak, predicted process peak, measured peak RSS
and anonymous memory, the error of the prediction, and the capped run's end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

MB = 2**20
ROOT = Path(__file__).resolve().parents[2]  # the folder holding the autorank package: the runner's PYTHONPATH

from autorank.device.cap import CgroupUnavailable, run_capped
from autorank.device.memory import read_status


def plans_of(run_dir: Path) -> dict[str, Path]:
    out = {"exported": run_dir / "plan.yaml"}
    for f in sorted((run_dir / "references").glob("*.yaml")):
        out[f.stem.replace("_", " ")] = f
    return {k: v for k, v in out.items() if v.is_file()}


def checkpoint_of(run_dir: Path) -> Path | None:
    for log in run_dir.glob("*.log"):
        m = re.search(r"autorank-device \S+ (\S+) \S+", log.read_text(errors="replace"))
        if m:
            return Path(m.group(1))
    return None


def sample(proc: subprocess.Popen, interval_s: float = 0.02) -> dict[str, int]:
    """Peaks of the process's VmRSS / RssAnon / RssFile (bytes) until it ends."""
    peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    while proc.poll() is None:
        s = read_status(proc.pid)
        for k in peak:
            peak[k] = max(peak[k], s[k])
        time.sleep(interval_s)
    return peak


def run_plan(python: list[str], plan: Path, ckpt: Path, data: Path, epochs: int) -> dict:
    argv = [*python, "-m", "autorank.device", str(plan), str(ckpt), str(data), "--epochs", str(epochs),
            "--ignore-memory-check"]
    env = {**os.environ, "AUTORANK_DEVICE_CHILD": "1", "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak = sample(proc)
    out = proc.stdout.read()
    m = re.search(r"predicted process peak (\d+) MB", out)
    return {"rc": proc.returncode, "wall_s": time.perf_counter() - t0, "predicted_mb": int(m.group(1)) if m else None,
            "rss_mb": peak["VmRSS"] / MB, "anon_mb": peak["RssAnon"] / MB, "file_mb": peak["RssFile"] / MB,
            "output": out[-3000:]}


def run_capped_plan(python: list[str], plan: Path, ckpt: Path, data: Path, epochs: int, cap_mb: float) -> dict:
    argv = [*python, "-m", "autorank.device", str(plan), str(ckpt), str(data), "--epochs", str(epochs)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = run_capped(int(cap_mb * MB), argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return {"cap_rc": res.returncode, "cap_peak_mb": res.peak_bytes / MB, "cap_oom_kills": res.oom_kills}


def main(argv=None, prog=None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--python", default=sys.executable, help="interpreter command (default: this one)")
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--data", type=Path, default=None, help="default: RUN_DIR/device_data.pt")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--cap-mb", type=float, default=None)
    ap.add_argument("--only", default=None, help="comma-separated plan names (default: all)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    python = shlex.split(a.python)
    ckpt = a.checkpoint or checkpoint_of(a.run_dir)
    data = a.data or a.run_dir / "device_data.pt"
    if ckpt is None or not ckpt.is_file() or not data.exists():
        ap.error(f"need the checkpoint ({ckpt}) and the data ({data})")
    rows = []
    plans = plans_of(a.run_dir)
    if a.only:
        plans = {k: v for k, v in plans.items() if k in a.only.split(",")}
    print("| plan | tensor peak MB | predicted process MB | measured peak RSS MB | anon MB | file MB | error |"
          + (f" under a {a.cap_mb:g} MB cgroup |" if a.cap_mb else ""))
    print("|---|---:|---:|---:|---:|---:|---:|" + ("---|" if a.cap_mb else ""))
    for name, plan in plans.items():
        meta = (yaml.safe_load(plan.read_text()) or {}).get("meta", {})
        r = {"plan": name, "tensor_mb": (meta.get("predicted_peak_bytes") or 0) / MB, **run_plan(python, plan, ckpt, data, a.epochs)}
        if a.cap_mb:
            try:
                r.update(run_capped_plan(python, plan, ckpt, data, a.epochs, a.cap_mb))
            except CgroupUnavailable as e:
                r["cap_rc"] = f"no cgroup: {e}"
        rows.append(r)
        err = "-" if not r["predicted_mb"] else f"{100 * (r['rss_mb'] - r['predicted_mb']) / r['predicted_mb']:+.1f}%"
        cap = ""
        if a.cap_mb:
            ends = {0: "completed", 3: "refused (exit 3)", 4: "killed, one line (exit 4)"}
            cap = f" {ends.get(r.get('cap_rc'), r.get('cap_rc'))}, cgroup peak {r.get('cap_peak_mb', 0):.0f} MB |"
        print(f"| {name} | {r['tensor_mb']:.0f} | {r['predicted_mb']} | {r['rss_mb']:.0f} | {r['anon_mb']:.0f} | "
              f"{r['file_mb']:.0f} | {err} |{cap}", flush=True)
        if r["rc"] != 0:
            print(r["output"], file=sys.stderr)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0
