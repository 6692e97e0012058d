"""Per-layer profile on calibration batches: the paper's rank selection inputs.

For each candidate layer: its input shape, the HOSVD_eps ranks of its input at each level of the
space, the sensitivity ("perplexity") of each choice, ||grad_W(low rank) - grad_W(exact)||_F
averaged over the batches, and the predicted peak training memory of the plans the knapsack needs
to derive per-layer additive costs (see knapsack.py). Cached as JSON keyed by everything that
determines it (checkpoint, calibration data, space, input shape, PROFILE_VERSION).

Ranks and reconstructions are autorank.shortcut.tucker's, as the HOSVD layer computes them: per
mode n the singular values of the unfolding X_(n) (tucker.unfold), rank = tucker.eps_rank of
them, factors = the leading left singular vectors (tucker.tucker_core / tucker_reconstruct).

Sensitivity of a choice: `full` 0; `frozen` ||grad_W(exact)||_F (no gradient at all);
`asi@eps` the weight gradient of the layer applied to the rank-r Tucker reconstruction of its
input, r the HOSVD_eps ranks (what ASI computes at convergence of its subspace iteration);
`lora@r` ||G - G_r||_F, G_r the best rank-r approximation of the exact weight gradient G (LoRA's
update B A has rank r: no rank-r update follows G closer, so this is LoRA's floor, an optimistic
figure: its first steps follow the random row space of A); `lora@r+asi@eps` the same of the
gradient on the reconstructed input. Inputs of linear layers may be (B, L, D) sequences: every
mode has its rank, and the weight gradient sums over B and L (F.linear's autograd).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from autorank.cost.loss import training_loss
from autorank.methods import key_choice
from autorank.plan import Choice, Plan
from autorank.search.cost import Choices, PeakRecord, PlanCost, peak_parts
from autorank.search.gradients import hosvd_reconstruct, lowrank_grad, mode_svds, weight_grad
from autorank.search.profilecache import dump_profile, read_profile
from autorank.search.progress import progress_bar
from autorank.search.protocols import Workload
from autorank.search.space import BLOCK_CHOICES, SearchSpace, level_key, parse_choice_key, parse_lora_key
from autorank.shortcut.tucker import eps_rank
from autorank.workload.cachefile import CacheDamaged, damaged_line, write_cache

log = logging.getLogger(__name__)

# 2: ranks by autorank.shortcut.tucker.eps_rank (its boundary: the first k whose cumulative share
# reaches eps exactly) instead of a local rule with a 1e-12 tolerance.
# 3: keep_batch choices (asi@<level>:b), the head rule, hparams in the space.
PROFILE_VERSION = 3
__all__ = ["LayerProfile", "Profile", "fill_peak_bytes", "hosvd_reconstruct", "layer_profile",
           "level_ranks", "load_cached", "lowrank_grad", "mode_svds", "profile_key", "profile_layers", "profile_workload",
           "weight_grad"]
PeakFn = Callable[[Choices], "PeakRecord | int"]
Batches = Sequence[tuple[Tensor, Tensor]]


@dataclass
class LayerProfile:
    name: str
    kind: str  # conv | linear | block (a block the space offers for recomputation)
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
    order: list[str] = field(default_factory=list)  # all conv/linear layers (space fill: full)

    @property
    def layer_names(self) -> list[str]:
        """Every entry: the conv/linear candidates, then the blocks offered for recomputation."""
        return [lp.name for lp in self.layers]

    @property
    def candidate_names(self) -> list[str]:
        """The conv/linear candidates, input to output (a trained region starts at one)."""
        return [lp.name for lp in self.layers if lp.kind != "block"]

    @property
    def block_names(self) -> list[str]:
        """The blocks offered for recomputation (`frozen`: kept as they are, or `recompute`)."""
        return [lp.name for lp in self.layers if lp.kind == "block"]

    def layer(self, name: str) -> LayerProfile:
        for lp in self.layers:
            if lp.name == name:
                return lp
        raise KeyError(name)

    def to_plan(self, choices: Choices, *, meta: Mapping[str, Any] | None = None) -> Plan:
        """A `Plan` from choice keys (asi ranks from this profile); layers not named are frozen.
        With the space's `fill: full` (self.order set), every non-candidate conv/linear layer after
        the first trained candidate trains plainly: the trained region is contiguous."""
        layers = {}
        for lp in self.layers:
            key = choices.get(lp.name, "frozen")
            if key != "frozen":
                layers[lp.name] = key_choice(key, lp.ranks)  # the method's Choice (autorank.methods)
        trained = [n for n in self.order if n in layers]
        if trained:
            cand = set(self.layer_names)
            start = self.order.index(trained[0])
            fill = {n: Choice.full() for n in self.order[start:] if n not in cand}
            blocks = {n: c for n, c in layers.items() if n not in self.order}  # recomputed blocks
            layers = {n: layers.get(n) or fill[n] for n in self.order if n in layers or n in fill} | blocks
        m = {"choices": {n: choices.get(n, "frozen") for n in self.layer_names},
             "space": self.space.get("name"), "profile": self.key[:16], **(meta or {})}
        return Plan(layers=layers, bn=self.space.get("bn", "frozen"), lean=self.space.get("lean", True),
                    meta=m)

    def to_json(self) -> str:
        """JSON with the sha256 of its content beside the fields (autorank.search.profilecache)."""
        return dump_profile(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> Profile:
        """CacheDamaged when `text` is not a whole profile (profilecache.read_profile)."""
        d = read_profile(text)
        d["layers"] = [LayerProfile(**lp) for lp in d["layers"]]
        return cls(**d)

    def save(self, path: str | Path) -> None:
        """Written atomically (the temp file is removed on error); a folder that cannot take it is
        one ConfigError line (autorank.workload.cachefile.write_cache)."""
        text = self.to_json()
        write_cache(Path(path), lambda tmp: tmp.write_text(text), "profile")


def load_cached(path: str | Path | None, key: str | None = None) -> Profile | None:
    """The profile cached at `path` when it is there, whole and of `key` (None: any key); a
    damaged one is reported in one warning line and None returned: the caller profiles again."""
    if path is None or not Path(path).exists():
        return None
    try:
        prof = Profile.from_json(Path(path).read_bytes())
    except (OSError, CacheDamaged) as e:
        log.warning(damaged_line("profile", Path(path), e, "profiling again"))
        return None
    return prof if key is None or prof.key == key else None


def tensor_sha256(t: Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def profile_key(checkpoint_sha: str, batches: Batches, space: SearchSpace,
                input_shape: Sequence[int], extra: Mapping[str, Any] | None = None) -> str:
    d = {"v": PROFILE_VERSION, "ckpt": checkpoint_sha, "space": space.sha256,
         "input_shape": list(input_shape),
         "data": [(tensor_sha256(x), tensor_sha256(y)) for x, y in batches], "extra": dict(extra or {})}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def capture(model: nn.Module, names: Sequence[str], x: Tensor, y: Tensor, loss: str = "class"):
    """Inputs and output grads of the named layers from one exact backward of the training loss
    (`loss`: "class" or "token", autorank.cost.loss)."""
    mods = dict(model.named_modules())
    inputs: dict[str, Tensor] = {}
    grads: dict[str, Tensor] = {}

    def hook(name):
        def fwd(mod, args, out):
            inputs[name] = args[0].detach()
            out.register_hook(lambda g: grads.__setitem__(name, g.detach()))
        return fwd

    handles = [mods[n].register_forward_hook(hook(n)) for n in names]
    try:
        with torch.enable_grad():
            training_loss(model(x), y, loss).backward()
    finally:
        for h in handles:
            h.remove()
    return inputs, grads


def level_ranks(svds: Sequence[Sequence[tuple[Tensor, Tensor]]], shape: Sequence[int],
                levels: Sequence[float]) -> dict[str, list[int]]:
    """Ranks per choice key: per level the max over batches of each mode's HOSVD_eps rank (never
    under-compress the worst batch); its keep_batch twin (asi@<level>:b) the same with rank[0] =
    the batch size (the batch mode kept whole)."""
    out = {}
    for lv in levels:
        r = [max(eps_rank(sv[m][0], lv) for sv in svds) for m in range(len(shape))]
        out[level_key(lv)] = r
        out[level_key(lv, True)] = [int(shape[0])] + r[1:]
    return out


def layer_profile(name: str, module: nn.Module, xs: Sequence[Tensor], gs: Sequence[Tensor],
                  space: SearchSpace, *, head: bool = False) -> LayerProfile:
    """One layer's ranks per level and sensitivity per choice from its captured inputs xs and
    output gradients gs (one per calibration batch). head: the last candidate (space.head rule).
    LoRA choices apply to nn.Linear layers only; a conv's are dropped."""
    svds = [mode_svds(x) for x in xs]
    ranks = level_ranks(svds, xs[0].shape, space.levels)
    exact = [weight_grad(module, x, g) for x, g in zip(xs, gs)]
    sens: dict[str, float] = {}
    choices = [c for c in space.layer_choices(name, head=head)
               if isinstance(module, nn.Linear) or parse_choice_key(c)[0] != "lora"]
    for ck in choices:
        kind, level = parse_choice_key(ck)
        if kind == "full":
            sens[ck] = 0.0
        elif kind == "frozen":
            sens[ck] = sum(float(g.norm()) for g in exact) / len(exact)
        else:
            lora = parse_lora_key(ck)[0] if kind == "lora" else None
            if level is not None and kind == "lora":
                ranks[ck] = ranks[level_key(level)]
            errs = []
            for x, g, sv, gw in zip(xs, gs, svds, exact):
                gl = gw if level is None else weight_grad(module, hosvd_reconstruct(x, sv, ranks[ck]), g)
                errs.append(float(((gl if lora is None else lowrank_grad(gl, lora)) - gw).norm()))
            sens[ck] = sum(errs) / len(errs)
    return LayerProfile(name=name, kind="conv" if isinstance(module, nn.Conv2d) else "linear",
                        input_shape=list(xs[0].shape), choices=choices,
                        ranks={k: v for k, v in ranks.items() if k in sens}, sensitivity=sens)


def block_profile(name: str) -> LayerProfile:
    """A block the space offers for recomputation: `frozen` (kept as it is) or `recompute`, both
    exact (sensitivity 0: recomputation changes no gradient, only memory and FLOPs). Listed
    after the layers, so the region's start is always a layer."""
    return LayerProfile(name=name, kind="block", input_shape=[], choices=list(BLOCK_CHOICES), ranks={},
                        sensitivity={c: 0.0 for c in BLOCK_CHOICES})


def profile_layers(model: nn.Module, batches: Batches, space: SearchSpace, *,
                   peak_fn: PeakFn | None = None, key: str | None = None,
                   cache_path: str | Path | None = None, progress: bool = True,
                   loss: str = "class") -> Profile:
    """Profile `space`'s candidate layers of `model` on `batches` (see module doc); `loss`: the
    training loss whose gradients are profiled ("token" for a language model).

    `peak_fn(choices)` predicts the peak training memory of a plan given as choice keys; the
    profile evaluates it on the plans the knapsack needs. With `cache_path`, a cached profile of the
    same `key` is returned as it is.
    """
    cached = load_cached(cache_path, key)
    if cached is not None:
        return cached
    names = space.resolve(model)
    model = copy.deepcopy(model).eval()  # BN in eval mode, as in the paper's fine-tuning
    for p in model.parameters():
        p.requires_grad_(True)
    mods = dict(model.named_modules())
    with progress_bar(progress) as bar:
        task = bar.add_task("profiling", total=len(batches) + len(names))
        captured = []
        for x, y in batches:
            captured.append(capture(model, names, x, y, loss))
            bar.advance(task)
        layers = []
        for name in names:
            bar.update(task, description=f"profiling {name}")
            layers.append(layer_profile(name, mods[name], [c[0][name] for c in captured],
                                        [c[1][name] for c in captured], space,
                                        head=name == names[-1]))
            bar.advance(task)
    layers += [block_profile(b) for b in space.recompute_blocks(model)]
    prof = Profile(key=key or "", space=space.to_dict(), layers=layers, order=space.fill_order(model))
    if peak_fn is not None:
        fill_peak_bytes(prof, peak_fn, progress=progress)
    if cache_path is not None:
        prof.save(cache_path)
    return prof


def fill_peak_bytes(prof: Profile, peak_fn: PeakFn, progress: bool = False) -> None:
    """The predictions the knapsack's additive costs derive from (about 2 per choice).

    `peak_fn` returns bytes, or a PeakMemory record whose transient part is kept apart (the
    transient is a max over layers, not a sum). A block offered for recomputation is priced by
    what recomputing it changes with its own candidate layers trained plainly (with them frozen
    it saves nothing and its backward holds more), as ref + that difference.
    """
    first = prof.layers[0].name
    # one ask per choice alone, one more per choice with the first layer (a block: with its own
    # layers trained, plus that context once)
    n = 1 + sum(len(lp.choices) * (2 if i or lp.kind == "block" else 1) + (lp.kind == "block")
                for i, lp in enumerate(prof.layers))
    with progress_bar(progress) as bar:
        task = bar.add_task("predicting peak memory per choice", total=n)

        def ask(ch):
            bar.advance(task)
            return peak_parts(peak_fn(ch))

        prof.ref_peak_bytes, prof.ref_transient_bytes = ask({first: "full"})
        for i, lp in enumerate(prof.layers):
            alone = {c: ask({lp.name: c}) for c in lp.choices}
            lp.alone_peak_bytes = {c: t for c, (t, _) in alone.items()}
            lp.alone_transient_bytes = {c: tr for c, (_, tr) in alone.items()}
            if lp.kind == "block":  # its saving shows with its own layers trained: priced in that context
                ctx = {first: "full"} | {n: "full" for n in prof.layer_names if n.startswith(lp.name + ".")}
                base, _ = ask(ctx)
                wf = {c: (prof.ref_peak_bytes + ask(ctx | {lp.name: c})[0] - base, 0) for c in lp.choices}
                lp.with_first_peak_bytes = {c: t for c, (t, _) in wf.items()}
                lp.with_first_transient_bytes = {c: tr for c, (_, tr) in wf.items()}
            elif i > 0:
                wf = {c: ask({first: "full", lp.name: c}) for c in lp.choices}
                lp.with_first_peak_bytes = {c: t for c, (t, _) in wf.items()}
                lp.with_first_transient_bytes = {c: tr for c, (_, tr) in wf.items()}


def profile_workload(workload: Workload, space: SearchSpace, *, n_batches: int = 2,
                     cache_dir: str | Path | None = None, progress: bool = True) -> Profile:
    """Profile a `Workload` (autorank.search.protocols) with its peak predictor (PlanCost);
    cached under `cache_dir`."""
    model = workload.model  # prepares the base model (and its checkpoint sha) first
    batches = workload.calibration_batches(n_batches)
    key = profile_key(workload.checkpoint_sha256, batches, space, workload.input_shape)
    cache_path = Path(cache_dir) / f"profile-{key[:16]}.json" if cache_dir else None
    cached = load_cached(cache_path, key)
    if cached is not None:
        return cached
    prof = profile_layers(model, batches, space, key=key, progress=progress, loss=workload.loss)
    prof.meta = {"checkpoint_sha256": workload.checkpoint_sha256,
                 "input_shape": list(workload.input_shape), "n_batches": n_batches}
    fill_peak_bytes(prof, PlanCost(model, workload.example_input(), prof, loss=workload.loss).peak,
                    progress=progress)
    if cache_path is not None:
        prof.save(cache_path)
    return prof
