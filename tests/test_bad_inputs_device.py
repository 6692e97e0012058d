"""Hostile and mistaken input to the device runner (`python -m autorank.device`) and its plan
files, one table per class: nothing it reads is overwritten, no small file makes it allocate,
non-finite values are named before training, and every refusal is one line with exit status 2.

Most cases run the runner in this process (autorank.device.main) and check: exit status 2, one
`error:` line holding the expected words, no training started, every file unchanged (sha256).
The cases whose point is time or memory run in a child process that reports its own peak."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import torch

from autorank.device import main
from autorank.models import mcunet_like
from autorank.plan import Choice, Plan, PlanError

KW = {"num_classes": 4, "width_mult": 0.25}
ASI_LAYER = "features.14.conv.2"
HEAD = "classifier.1"  # nn.Linear(in 40, out 4) at width 0.25


def _plan(**meta) -> Plan:
    return Plan({ASI_LAYER: Choice.asi([4, 8, 2, 2]), HEAD: Choice.full()},
                meta={"model": {"factory": "autorank.models:mcunet_like", "kwargs": KW},
                      "input_shape": [8, 3, 32, 32], **meta})


def _data(n: int = 20, n_val: int = 6) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(n, 3, 32, 32, generator=g), "y": torch.randint(0, 4, (n,), generator=g),
            "x_val": torch.randn(n_val, 3, 32, 32, generator=g), "y_val": torch.randint(0, 4, (n_val,), generator=g)}


def _files(d: Path) -> list[str]:
    """A plan (fingerprinted), a checkpoint with a 10-class upstream head, and data: the good
    inputs each case spoils one of."""
    torch.manual_seed(1)
    torch.save(mcunet_like(num_classes=10, width_mult=0.25).state_dict(), d / "ckpt.pt")
    _plan().save(d / "plan.yaml", model=mcunet_like(**KW))
    torch.save(_data(), d / "data.pt")
    (d / "adir").mkdir()
    (d / "afile").write_text("a file, not a folder\n")
    return [str(d / "plan.yaml"), str(d / "ckpt.pt"), str(d / "data.pt")]


def _snapshot(d: Path) -> dict[str, str]:
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def _refused(d: Path, capsys, argv: list[str], words: tuple[str, ...]) -> str:
    """Run the runner here on `argv`: exit 2, one error line with `words`, nothing trained or
    written. Returns the line."""
    before = _snapshot(d)
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == 2, (out[-2000:], err[-2000:])
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert "fine-tuning" not in out  # refused before training
    assert _snapshot(d) == before, "a file changed or appeared"
    return lines[0]


# -- class 1: --out never writes over an input, and an unwritable --out is found before work ---
def _link(d: Path, target: str, hard: bool) -> str:
    (os.link if hard else os.symlink)(d / target, d / "linked")
    return str(d / "linked")


OUT_CASES = {
    "the plan file": (lambda d: str(d / "plan.yaml"), ("--out=", "is the plan file", "choose another path")),
    "the checkpoint": (lambda d: str(d / "ckpt.pt"), ("is the checkpoint",)),
    "the data file": (lambda d: str(d / "data.pt"), ("is the data file",)),
    "the data file by a relative path": (lambda d: os.path.relpath(d / "data.pt"), ("is the data file",)),
    "a symlink to the plan": (lambda d: _link(d, "plan.yaml", hard=False), ("is the plan file",)),
    "a hard link to the checkpoint": (lambda d: _link(d, "ckpt.pt", hard=True), ("is the checkpoint",)),
    "a folder": (lambda d: str(d / "adir"), ("adir is a directory",)),
    "under a file": (lambda d: str(d / "afile" / "w.pt"), ("afile is a file, not a folder",)),
    "an unwritable folder": (lambda d: "/proc/autorank/w.pt", ("cannot be written",)),
}


@pytest.mark.parametrize("case", list(OUT_CASES))
def test_out_never_overwrites_an_input_and_is_checked_before_work(tmp_path, capsys, case):
    files = _files(tmp_path)
    out, words = OUT_CASES[case]
    _refused(tmp_path, capsys, [*files, "--out", out(tmp_path)], words)


# -- class 3: a small file that would eat the machine --------------------------------------------
def _bomb_text(levels: int = 9) -> str:
    """A plan of about 500 bytes whose classifier choice names 9**9 (387 million) strings (the
    anchors sit in meta, which takes any keys)."""
    lines = ["format_version: 1", "bn: frozen", "lean: true", "meta:",
             "  a0: &a0 [" + ",".join(["lol"] * 9) + "]"]
    lines += [f"  a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines + [f"layers: {{{HEAD}: *a{levels - 1}}}"]) + "\n"


def test_an_alias_bomb_is_refused_at_once_with_little_memory(tmp_path):
    p = tmp_path / "bomb.yaml"
    p.write_text(_bomb_text())
    assert p.stat().st_size < 1100
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(PlanError, match="expands to more than 1,000,000 values once its YAML aliases"):
            Plan.load(p)
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 0.5, elapsed
    assert peak < 5 * 2**20, peak  # Python objects allocated while refusing it


def test_a_plan_with_benign_aliases_still_loads_and_plans_are_written_without_them(tmp_path):
    shared = [8, 3, 32, 32]
    plan = _plan(input_shape=shared, costed_shape=shared)  # one object twice: no &anchor written
    plan.save(tmp_path / "p.yaml")
    text = (tmp_path / "p.yaml").read_text()
    assert "&" not in text and "*" not in text
    (tmp_path / "q.yaml").write_text(text.replace("input_shape: [8, 3, 32, 32]", "input_shape: &s [8, 3, 32, 32]")
                                     .replace("costed_shape: [8, 3, 32, 32]", "costed_shape: *s"))
    assert "&s" in (tmp_path / "q.yaml").read_text()
    assert Plan.load(tmp_path / "q.yaml").meta["costed_shape"] == shared


def _plan_text(d: Path, text: str) -> list[str]:
    (d / "plan.yaml").write_text(text)
    return [str(d / "plan.yaml"), str(d / "ckpt.pt"), str(d / "data.pt")]


def _plan_with(d: Path, layers=None, fingerprint=True, **meta) -> list[str]:
    plan = _plan(**meta)
    if layers is not None:
        plan = Plan(layers, meta=plan.meta)
    plan.save(d / "plan.yaml", model=mcunet_like(**KW) if fingerprint else None)
    return [str(d / "plan.yaml"), str(d / "ckpt.pt"), str(d / "data.pt")]


def _plan_choice(d: Path, choice: str) -> list[str]:
    """The good plan with its classifier's choice replaced in the file's text."""
    files = _plan_with(d)
    text = (d / "plan.yaml").read_text()
    assert f"{HEAD}: full" in text
    (d / "plan.yaml").write_text(text.replace(f"{HEAD}: full", f"{HEAD}: '{choice}'"))
    return files


def _huge_file(d: Path) -> list[str]:
    with open(d / "plan.yaml", "ab") as f:
        f.truncate(17 * 2**20)  # sparse: st_size is what the reader checks first
    return [str(d / "plan.yaml"), str(d / "ckpt.pt"), str(d / "data.pt")]


def _deep_json(d: Path) -> list[str]:
    (d / "plan.json").write_text("[" * 200_000 + "]" * 200_000)
    return [str(d / "plan.json"), str(d / "ckpt.pt"), str(d / "data.pt")]


SMALL_FILE_CASES = {
    "alias bomb": (lambda d: _plan_text(d, _bomb_text()), ("expands to more than", "without anchors")),
    "alias inside itself": (lambda d: _plan_text(d, "format_version: 1\nlayers: &a {x: [*a]}\n"),
                            ("alias (*name) inside its own anchor",)),
    "17 MB plan": (_huge_file, ("bytes, more than the 16,777,216",)),
    "200k nested brackets": (_deep_json, ("nested too deeply",)),
    "lora[100000000000]": (lambda d: _plan_choice(d, "lora[100000000000]"), ("a lora rank must be at most 2147483647",)),
    "lora[1000000] on a 40x4 layer": (lambda d: _plan_choice(d, "lora[1000000]"),
                                       ("lora rank 1000000 is above", "40 in, 4 out", "at most 40")),
    "asi rank beyond 32 bits": (lambda d: _plan_choice(d, "asi[4,99999999999]"), ("asi ranks must be at most",)),
    "asi with 2 ranks on a conv": (lambda d: _plan_with(d, {ASI_LAYER: "asi[4,8]", HEAD: "full"}),
                                   ("gives 2 ASI ranks", "needs 4")),
    "input_shape of 10**8 samples": (lambda d: _plan_with(d, input_shape=[10**8, 3, 32, 32]),
                                     ("a batch of 100,000,000 samples needs", "--batch-size")),
    "input_shape of 10**12 samples": (lambda d: _plan_with(d, input_shape=[10**12, 3, 32, 32]),
                                      ("input_shape must be at most 8 sizes, each in [1, 2147483647]",)),
    "input_shape of 0": (lambda d: _plan_with(d, input_shape=[0, 3, 32, 32]), ("input_shape",)),
    "model of 3 TB without a fingerprint": (
        lambda d: _plan_with(d, fingerprint=False, model={"factory": "autorank.models:mcunet_like",
                                                          "kwargs": {"num_classes": 4, "width_mult": 1000}}),
        ("MB of weights, more than the", "check the model kwargs")),
}


@pytest.mark.parametrize("case", list(SMALL_FILE_CASES))
def test_a_small_file_is_refused_before_anything_large_is_built(tmp_path, capsys, case):
    _files(tmp_path)
    make, words = SMALL_FILE_CASES[case]
    argv = make(tmp_path)
    t0 = time.perf_counter()
    _refused(tmp_path, capsys, argv, words)
    assert time.perf_counter() - t0 < 30


MEASURE = r"""
import json, resource, sys, time
import torch, autorank.device.runner as runner
from autorank.device import main
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "s": time.perf_counter() - t0,
                  "rise_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024}))
"""


@pytest.mark.parametrize("case", ["alias bomb", "model kwargs of 2.6 GB against a fingerprint"])
def test_refused_in_under_a_second_with_a_small_memory_rise(tmp_path, case):
    """A child process measures its own peak: the refusals allocate nothing of the sizes named."""
    files = _files(tmp_path)
    if case == "alias bomb":
        _plan_text(tmp_path, _bomb_text())
        words = "expands to more than"
    else:  # the plan's fingerprint is of width 0.25; its kwargs, tampered, build 2.6 GB of weights
        plan = _plan().for_model(mcunet_like(**KW))
        plan.meta["model"] = {"factory": "autorank.models:mcunet_like",
                              "kwargs": {"num_classes": 4, "width_mult": 28}}
        plan.save(tmp_path / "plan.yaml")
        words = "first mismatched layer"
    r = subprocess.run([sys.executable, "-c", MEASURE, *files], capture_output=True, text=True, timeout=120)
    figures = json.loads(r.stdout.strip().splitlines()[-1])
    assert figures["rc"] == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert figures["s"] < 1.0, figures
    assert figures["rise_mb"] < 100, figures


# -- class 4: non-finite values in the data or the checkpoint, named before training ----------
def _spoil_data(d: Path, key: str, values) -> None:
    data = _data()
    data[key].view(-1)[: len(values)] = torch.tensor(values)
    torch.save(data, d / "data.pt")


def _spoil_ckpt(d: Path, key: str, value: float) -> None:
    state = torch.load(d / "ckpt.pt", weights_only=True)
    state[key].view(-1)[0] = value
    torch.save(state, d / "ckpt.pt")


NONFINITE_CASES = {
    "NaN in x_val": (lambda d: _spoil_data(d, "x_val", [float("nan")] * 3), ("x_val holds 3 NaN values",)),
    "inf in x": (lambda d: _spoil_data(d, "x", [float("inf"), -float("inf")]), ("'s x holds 2 infinite values",)),
    "NaN and inf in x": (lambda d: _spoil_data(d, "x", [float("nan"), float("inf")]),
                         ("x holds 1 NaN and 1 infinite values", "torch.nan_to_num")),
    "NaN weight in the checkpoint": (lambda d: _spoil_ckpt(d, "features.0.0.weight", float("nan")),
                                     ("ckpt.pt's features.0.0.weight holds 1 NaN values", "diverged")),
    "inf running variance": (lambda d: _spoil_ckpt(d, "features.0.1.running_var", float("inf")),
                             ("features.0.1.running_var holds 1 infinite values",)),
}


@pytest.mark.parametrize("case", list(NONFINITE_CASES))
def test_nonfinite_values_are_named_before_training(tmp_path, capsys, case):
    files = _files(tmp_path)
    spoil, words = NONFINITE_CASES[case]
    spoil(tmp_path)
    _refused(tmp_path, capsys, files, words)


def test_a_nan_in_the_fresh_head_of_the_checkpoint_does_not_matter(tmp_path, capsys):
    """The upstream head is skipped (another shape): its values are never used."""
    files = _files(tmp_path)
    _spoil_ckpt(tmp_path, f"{HEAD}.weight", float("nan"))
    assert main([*files, "--epochs", "0"]) == 0


# -- class 5: what used to be a traceback is one line ------------------------------------------
def _save_data(d: Path, **change) -> None:
    data = {**_data(), **change}
    torch.save({k: v for k, v in data.items() if v is not None}, d / "data.pt")


def _ckpt_with(d: Path, key: str, fn) -> None:
    state = torch.load(d / "ckpt.pt", weights_only=True)
    state[key] = fn(state[key])
    torch.save(state, d / "ckpt.pt")


TRACEBACK_CASES = {
    "0-d x": (lambda d: _save_data(d, x=torch.tensor(1.0)), [], ("'x' is a single number (a 0-d tensor)",)),
    "0-d y": (lambda d: _save_data(d, y=torch.tensor(1)), [], ("'y' is a single number",)),
    "labels (N, 1)": (lambda d: _save_data(d, y=torch.zeros(20, 1, dtype=torch.long)), [],
                      ("'y' has shape [20, 1]", "y.reshape(-1)")),
    "sparse x": (lambda d: _save_data(d, x=_data()["x"].to_sparse()), [], ("'x' is a sparse_coo tensor", "to_dense")),
    "meta x_val": (lambda d: _save_data(d, x_val=torch.empty(6, 3, 32, 32, device="meta")), [],
                   ("'x_val' is a meta tensor",)),
    "complex x": (lambda d: _save_data(d, x=torch.zeros(20, 3, 32, 32, dtype=torch.complex64)), [],
                  ("'x' is torch.complex64",)),
    "sparse weight": (lambda d: _ckpt_with(d, "features.0.0.weight", lambda t: t.to_sparse()), [],
                      ("'features.0.0.weight' is a torch.sparse_coo tensor", "dense")),
    "meta weight": (lambda d: _ckpt_with(d, "features.0.0.weight", lambda t: t.to("meta")), [],
                    ("'features.0.0.weight' is a meta tensor",)),
    "--lr 1e300": (None, ["--lr", "1e300"], ("--lr must be at most 1000, got 1e+300",)),
    "--lr inf": (None, ["--lr", "inf"], ("--lr must be a finite number > 0",)),
    "--lr -1": (None, ["--lr", "-1"], ("--lr must be a finite number > 0",)),
    "the plan's lr 1e300": (lambda d: _plan_with(d, lr=1e300), [], ("learning rate 1e+300 is above 1000",)),
    "the plan's lr inf": (lambda d: _plan_with(d, lr=float("inf")), [], ("lr must be a finite number > 0",)),
    "--seed 2**64": (None, ["--seed", str(2**64)], ("--seed must be a whole number in",)),
    "--seed -2**64": (None, ["--seed", str(-(2**64))], ("--seed must be a whole number in",)),
    "the plan's seed 2**70": (lambda d: _plan_with(d, seed=2**70), [], ("seed must be a whole number in",)),
    "--batch-size 2**63": (None, ["--batch-size", str(2**63)], ("--batch-size must be at most 9223372036854775807",)),
    "--batch-size 10**12": (None, ["--batch-size", str(10**12)], ("a batch of 1,000,000,000,000 samples needs",)),
    "--steps 10**30": (None, ["--steps", str(10**30)], ("--steps must be at most",)),
}


@pytest.mark.parametrize("case", list(TRACEBACK_CASES))
def test_what_was_a_traceback_is_one_line_and_exit_2(tmp_path, capsys, case):
    files = _files(tmp_path)
    spoil, args, words = TRACEBACK_CASES[case]
    if spoil is not None:
        spoil(tmp_path)
    _refused(tmp_path, capsys, [*files, *args], words)


def test_ctrl_c_while_training_is_one_line_exit_130_and_writes_nothing(tmp_path):
    files = _files(tmp_path)
    out = tmp_path / "w.pt"
    proc = subprocess.Popen([sys.executable, "-m", "autorank.device", *files, "--epochs", "100000",
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        for line in proc.stdout:  # wait until it trains
            if line.startswith("fine-tuning"):
                break
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert [line for line in err.splitlines() if line.strip()] == ["error: interrupted (Ctrl-C): nothing was saved"]
    assert not out.exists() and not any(p.name.startswith(".w.pt") for p in tmp_path.iterdir())


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed one, on purpose
def test_a_ctrl_c_swallowed_by_a_finalizer_is_raised_at_the_next_step():
    """Python swallows an exception raised inside __del__ or a weakref callback ("Exception
    ignored"); the runner's latch raises the interrupt again at the next training step."""
    from autorank.device.sigint import SigintLatch

    class SignalsWhenFreed:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # bytecodes for the handler to run in, still inside __del__
                pass

    previous = signal.getsignal(signal.SIGINT)
    with SigintLatch() as latch:
        try:
            SignalsWhenFreed()
        except KeyboardInterrupt:  # landed outside the finalizer: raised at once, also fine
            pass
        assert latch.hit
        with pytest.raises(KeyboardInterrupt):
            latch.check()
    assert signal.getsignal(signal.SIGINT) is previous
