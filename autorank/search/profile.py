"""Per-layer profile on calibration batches: the paper's rank selection inputs.

For each candidate layer: its input shape, the HOSVD_eps ranks of its input at each level of the
space, the sensitivity ("perplexity") of each choice, ||grad_W(low rank) - grad_W(exact)||_F
averaged over the batches, and the predicted peak training memory of the plans the knapsack needs
to derive per-layer additive costs (see knapsack.py). Cached as JSON keyed by everything that
determines it (checkpoint, calibration data, space, input shape, the cost model's version).

Sensitivity of a choice: `full` 0; `frozen` ||grad_W(exact)||_F (no gradient at all);
`asi@eps` the weight gradient of the layer applied to the rank-r Tucker reconstruction of its
input, r the HOSVD_eps ranks (what ASI computes at convergence of its subspace iteration).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autorank.plan.plan import atomic_write
from autorank.search.space import SearchSpace, level_key, parse_choice_key

PROFILE_VERSION = 1
Choices = Mapping[str, str]  # layer name -> choice key ("frozen", "full", "asi@0.8")
PeakFn = Callable[[Choices], int]


# --- Tucker helpers (small, local: the profile must not depend on the layers' run-time code) ---

def _mode_eig(x: Tensor, mode: int) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending) and eigenvectors of the mode-n Gram X_(n) X_(n)^T."""
    xn = x.movedim(mode, 0).reshape(x.shape[mode], -1).double()
    evals, evecs = torch.linalg.eigh(xn @ xn.T)  # ascending
    return evals.flip(0).clamp_min(0), evecs.flip(1)


def eps_rank(evals: Tensor, eps: float) -> int:
    """Smallest k whose top-k squared singular values reach eps of the total."""
    total = float(evals.sum())
    if total <= 0:
        return 1
    frac = torch.cumsum(evals, 0) / total
    return int(min(int((frac < eps - 1e-12).sum()) + 1, evals.numel()))


def project(x: Tensor, evecs: Sequence[Tensor], ranks: Sequence[int]) -> Tensor:
    """Rank-r Tucker reconstruction: x x_n (U_n U_n^T) over the modes with r_n < size."""
    out = x.double()
    for mode, (u, r) in enumerate(zip(evecs, ranks)):
        if r >= x.shape[mode]:
            continue
        un = u[:, :r]
        moved = out.movedim(mode, -1)
        out = ((moved @ un) @ un.T).movedim(-1, mode)
    return out.to(x.dtype)


def weight_grad(module: nn.Module, x: Tensor, grad_out: Tensor) -> Tensor:
    """dL/dW of `module` applied to x, given dL/dy (bias excluded)."""
    w = module.weight.detach().requires_grad_(True)
    with torch.enable_grad():
        if isinstance(module, nn.Conv2d):
            y = F.conv2d(x, w, None, module.stride, module.padding, module.dilation, module.groups)
        elif isinstance(module, nn.Linear):
            y = F.linear(x, w)
        else:
            raise TypeError(f"cannot profile {type(module).__name__}")
        (g,) = torch.autograd.grad(y, w, grad_out)
    return g


# --- the profile ---

@dataclass
class LayerProfile:
    name: str
    kind: str  # conv | linear
    input_shape: list[int]
    choices: list[str]
    ranks: dict[str, list[int]]  # asi@level -> ranks per input mode
    sensitivity: dict[str, float]  # choice -> mean ||grad_W(choice) - grad_W(exact)||_F
    alone_peak_bytes: dict[str, int] = field(default_factory=dict)  # {this: c}, others frozen
    with_first_peak_bytes: dict[str, int] = field(default_factory=dict)  # {first: full, this: c}
    alone_transient_bytes: dict[str, int] = field(default_factory=dict)  # the max part of those
    with_first_transient_bytes: dict[str, int] = field(default_factory=dict)


@dataclass
class Profile:
    key: str
    space: dict[str, Any]
    layers: list[LayerProfile]
    ref_peak_bytes: int = 0  # peak of {first candidate: full}, others frozen
    ref_transient_bytes: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def layer_names(self) -> list[str]:
        return [lp.name for lp in self.layers]

    def layer(self, name: str) -> LayerProfile:
        for lp in self.layers:
            if lp.name == name:
                return lp
        raise KeyError(name)

    def to_plan(self, choices: Choices, *, meta: Mapping[str, Any] | None = None):
        """A `Plan` from choice keys (asi ranks from this profile); layers not named are frozen."""
        from autorank.plan import Choice, Plan

        layers = {}
        for lp in self.layers:
            key = choices.get(lp.name, "frozen")
            kind, _ = parse_choice_key(key)
            if kind == "frozen":
                continue
            layers[lp.name] = Choice.full() if kind == "full" else Choice.asi(tuple(lp.ranks[key]))
        space = self.space
        m = {"choices": {n: choices.get(n, "frozen") for n in self.layer_names},
             "space": space.get("name"), "profile": self.key[:16]}
        m.update(meta or {})
        return Plan(layers=layers, bn=space.get("bn", "frozen"), lean=space.get("lean", True), meta=m)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Profile":
        d = json.loads(text)
        d["layers"] = [LayerProfile(**lp) for lp in d["layers"]]
        return cls(**d)

    def save(self, path: str | Path) -> None:
        """Written atomically (autorank.plan.plan.atomic_write: the temp file is removed on error)."""
        text = self.to_json()
        atomic_write(Path(path), lambda tmp: tmp.write_text(text))


def _tensor_sha(t: Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def profile_key(checkpoint_sha: str, batches: Sequence[tuple[Tensor, Tensor]], space: SearchSpace,
                input_shape: Sequence[int], extra: Mapping[str, Any] | None = None) -> str:
    d = {"v": PROFILE_VERSION, "ckpt": checkpoint_sha, "space": space.sha256,
         "input_shape": list(input_shape),
         "data": [(_tensor_sha(x), _tensor_sha(y)) for x, y in batches], "extra": dict(extra or {})}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def _capture(model: nn.Module, names: Sequence[str], x: Tensor, y: Tensor):
    """Inputs and output grads of the named layers from one exact backward."""
    mods = dict(model.named_modules())
    inputs: dict[str, Tensor] = {}
    grads: dict[str, Tensor] = {}
    handles = []

    def hook(name):
        def fwd(mod, args, out):
            inputs[name] = args[0].detach()
            out.register_hook(lambda g: grads.__setitem__(name, g.detach()))
        return fwd

    for n in names:
        handles.append(mods[n].register_forward_hook(hook(n)))
    try:
        with torch.enable_grad():
            out = model(x)
            F.cross_entropy(out, y).backward()
    finally:
        for h in handles:
            h.remove()
    return inputs, grads


def profile_layers(model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]], space: SearchSpace,
                   *, peak_fn: PeakFn | None = None, key: str | None = None,
                   cache_path: str | Path | None = None, progress: bool = True) -> Profile:
    """Profile `space`'s candidate layers of `model` on `batches` (see module doc).

    `peak_fn(choices) -> bytes` predicts peak training memory of a plan given as choice keys; the
    profile evaluates it on the plans the knapsack needs. With `cache_path`, a cached profile of the
    same `key` is returned as it is.
    """
    if cache_path is not None and Path(cache_path).exists():
        cached = Profile.from_json(Path(cache_path).read_text())
        if key is None or cached.key == key:
            return cached
    names = space.resolve(model)
    model = copy.deepcopy(model).eval()  # BN in eval mode, as in the paper's fine-tuning
    for p in model.parameters():
        p.requires_grad_(True)
    mods = dict(model.named_modules())
    levels = [level_key(lv) for lv in space.levels]
    captured = []
    with _progress(progress) as bar:
        task = bar.add_task("profiling", total=len(batches) + len(names) + (1 if peak_fn else 0))
        for x, y in batches:
            captured.append(_capture(model, names, x, y))
            bar.advance(task)
        layers: list[LayerProfile] = []
        for name in names:
            bar.update(task, description=f"profiling {name}")
            mod = mods[name]
            xs = [c[0][name] for c in captured]
            gs = [c[1][name] for c in captured]
            eigs = [[_mode_eig(x, m) for m in range(x.dim())] for x in xs]
            # ranks per level: the max over batches (never under-compress the worst batch)
            ranks = {lk: [max(eps_rank(e[m][0], lv) for e in eigs) for m in range(xs[0].dim())]
                     for lk, lv in zip(levels, space.levels)}
            exact = [weight_grad(mod, x, g) for x, g in zip(xs, gs)]
            sens: dict[str, float] = {}
            for ck in space.layer_choices(name):
                kind, _ = parse_choice_key(ck)
                if kind == "full":
                    sens[ck] = 0.0
                elif kind == "frozen":
                    sens[ck] = sum(float(g.norm()) for g in exact) / len(exact)
                else:
                    errs = []
                    for x, g, e, gw in zip(xs, gs, eigs, exact):
                        xr = project(x, [ev for _, ev in e], ranks[ck])
                        errs.append(float((weight_grad(mod, xr, g) - gw).norm()))
                    sens[ck] = sum(errs) / len(errs)
            layers.append(LayerProfile(
                name=name, kind="conv" if isinstance(mod, nn.Conv2d) else "linear",
                input_shape=list(xs[0].shape), choices=space.layer_choices(name),
                ranks={k: v for k, v in ranks.items() if k in sens}, sensitivity=sens))
            bar.advance(task)
        prof = Profile(key=key or "", space=space.to_dict(), layers=layers)
        if peak_fn is not None:
            bar.update(task, description="predicting peak memory per choice")
            fill_peak_bytes(prof, peak_fn)
            bar.advance(task)
    if cache_path is not None:
        prof.save(cache_path)
    return prof


def peak_parts(value) -> tuple[int, int]:
    """(total, transient) bytes from a PeakMemory-like record (or a plain int: no transient)."""
    if hasattr(value, "total_bytes"):
        return int(value.total_bytes), int(getattr(value, "transient_bytes", 0))
    return int(value), 0


def fill_peak_bytes(prof: Profile, peak_fn: PeakFn, progress: bool = False) -> None:
    """The predictions the knapsack's additive costs derive from (about 2 per choice).

    `peak_fn` returns bytes, or a PeakMemory-like record whose transient part is kept apart
    (the transient is a max over layers, not a sum).
    """
    first = prof.layers[0].name
    n = 1 + sum(len(lp.choices) * (2 if i else 1) for i, lp in enumerate(prof.layers))
    with _progress(progress) as bar:
        task = bar.add_task("predicting peak memory per choice", total=n)

        def ask(ch):
            bar.advance(task)
            return peak_parts(peak_fn(ch))

        prof.ref_peak_bytes, prof.ref_transient_bytes = ask({first: "full"})
        for i, lp in enumerate(prof.layers):
            alone = {c: ask({lp.name: c}) for c in lp.choices}
            lp.alone_peak_bytes = {c: t for c, (t, _) in alone.items()}
            lp.alone_transient_bytes = {c: tr for c, (_, tr) in alone.items()}
            if i > 0:
                wf = {c: ask({first: "full", lp.name: c}) for c in lp.choices}
                lp.with_first_peak_bytes = {c: t for c, (t, _) in wf.items()}
                lp.with_first_transient_bytes = {c: tr for c, (_, tr) in wf.items()}


def peak_predictor(model: nn.Module, example_input: Tensor, profile: Profile | None = None,
                   **cost_kwargs) -> "CachedPeak":
    return CachedPeak(model, example_input, profile, **cost_kwargs)


class CachedPeak:
    """choices -> predicted peak training bytes (autorank.cost), cached by the choices."""

    def __init__(self, model: nn.Module, example_input: Tensor, profile: Profile | None = None,
                 **cost_kwargs):
        self.model, self.example_input, self.profile = model, example_input, profile
        self.cost_kwargs = cost_kwargs
        self.cache: dict[tuple, Any] = {}

    def full(self, choices: Choices):
        """The whole PeakMemory record."""
        from autorank.cost import predict_peak_training_bytes

        k = tuple(sorted((n, c) for n, c in choices.items() if c != "frozen"))
        if k not in self.cache:
            plan = self.profile.to_plan(choices)
            self.cache[k] = predict_peak_training_bytes(self.model, self.example_input, plan,
                                                        **self.cost_kwargs)
        return self.cache[k]

    def __call__(self, choices: Choices):
        """The PeakMemory record (knapsack and profile read total_bytes and transient_bytes)."""
        return self.full(choices)

    def total(self, choices: Choices) -> int:
        return int(self.full(choices).total_bytes)


def profile_workload(workload, space: SearchSpace, *, n_batches: int = 2,
                     cache_dir: str | Path | None = None, progress: bool = True) -> Profile:
    """Profile a `Workload` (ARCHITECTURE.md) with its cost model; cached under `cache_dir`."""
    model = workload.model  # prepares the base model (and its checkpoint sha) first
    batches = workload.calibration_batches(n_batches)
    key = profile_key(workload.checkpoint_sha256, batches, space, workload.input_shape)
    cache_path = Path(cache_dir) / f"profile-{key[:16]}.json" if cache_dir else None
    if cache_path is not None and cache_path.exists():
        return Profile.from_json(cache_path.read_text())
    prof = profile_layers(model, batches, space, key=key, progress=progress)
    prof.meta = {"checkpoint_sha256": workload.checkpoint_sha256,
                 "input_shape": list(workload.input_shape), "n_batches": n_batches}
    peak = CachedPeak(model, workload.example_input(), prof)
    fill_peak_bytes(prof, peak, progress=progress)
    if cache_path is not None:
        prof.save(cache_path)
    return prof


class _NullBar:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def add_task(self, *a, **k):
        return 0

    def advance(self, *a, **k):
        pass

    def update(self, *a, **k):
        pass


def _progress(enabled: bool):
    if not enabled:
        return _NullBar()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), transient=False)
