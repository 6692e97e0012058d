"""What a search returns, whichever ran: the Optuna study (study.py) or the paper's planner
(planner.py). Both give a `SearchResult` of trial records (the planner's one plan is a record
too), and the result prints its own summary: one table a user reads, holding the front, the
exported plan, the best plain-only plan and the refit references, then the exported plan against
them and a few points of the budget curve.

No Optuna import: the planner's path runs without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from autorank.redact import redact_url
from autorank.search.budget import BudgetPoint, budget_curve
from autorank.search.records import TrialRecord
from autorank.units import MB

PlanCode = Callable[[Mapping[str, str]], str]  # choices -> the plan column's text


class SummaryDevice(Protocol):
    """What the summary reads of the device (autorank.workload.DeviceProfile)."""

    name: str
    process_budget_mb: float
    runtime_mb: float

    @property
    def budget_bytes(self) -> int: ...

    def step_time_s(self, flops: float) -> float: ...

    def process_peak(self, tensor_peak_bytes: int) -> Any: ...


@dataclass
class SearchResult:
    """The trials a search ran (`trials`), its front, the plan it exported (`best`, written to
    `export_path`), and where the study lives (Optuna only: study_name, storage, study)."""

    search: str  # "optuna" | "knapsack": the search that ran
    budget_bytes: int
    trials: list[TrialRecord]
    front: list[TrialRecord]
    best: TrialRecord | None
    loss: str = "class"  # the workload's: "token" (a language model) adds perplexities
    export_path: Path | None = None
    study_name: str | None = None
    storage: str | None = None
    n_new: int = 0
    wall_s: float = 0.0
    time_split_s: dict[str, float] = field(default_factory=dict)  # profile, predict, train, log
    plan_files: dict[int, Path] = field(default_factory=dict)
    study: Any = field(default=None, repr=False, compare=False)  # the optuna.Study
    best_plain: TrialRecord | None = None  # the best plain-only feasible trial (by refit, else proxy)
    best_exact: TrialRecord | None = None  # the best with blocks recomputed and no ranks (exact, not plain)
    references: dict[str, dict] = field(default_factory=dict)  # refit.refit_references
    reference_files: dict[str, Path] = field(default_factory=dict)  # write_reference_plans
    refit_steps: int | None = None
    run_id: str | None = None  # the tracker's run of a single plan (the planner)
    val_count: int | None = None  # validation images (a classifier): the verdict's noise

    def rows(self) -> list[tuple[str, TrialRecord | None, Mapping[str, Any] | None]]:
        """The summary table's rows, by predicted peak: (role, record or None, reference or
        None). Every front point, and the exported plan, the best plain-only plan and the refit
        references even where they are not on the front (a refit plan may not be), each once."""
        roles: dict[int, list[str]] = {}
        recs: dict[int, TrialRecord] = {}
        for r in self.front:
            recs[r.number] = r
            roles.setdefault(r.number, [])
        for role, r in (("exported", self.best), ("best plain", self.best_plain), ("best recomputed", self.best_exact)):
            if r is not None:
                recs.setdefault(r.number, r)
                roles.setdefault(r.number, []).append(role)
        out: list[tuple[int, str, TrialRecord | None, Mapping[str, Any] | None]] = [
            (int(recs[n].predicted_peak_bytes or 0), ", ".join(roles[n]) or "front", recs[n], None)
            for n in recs]
        for name, ref in (self.references or {}).items():
            role = name + (" (over budget)" if ref.get("over_budget") else "")
            out.append((int(ref["peak_bytes"]), role, None, ref))
        return [(role, rec, ref) for _, role, rec, ref in sorted(out, key=lambda t: (t[0], t[1]))]

    def summary(self, console: Any, device: SummaryDevice, plan_code: PlanCode | None = None) -> None:
        """Print the summary on a rich Console (see the module doc). plan_code: choices -> the
        plan column's text (the app's short codes); None: the choice keys."""
        code = plan_code or (lambda ch: " ".join(ch.values()))
        console.print(self._header())
        console.print(self.table(device, code))
        if self.best is None:
            console.print("[red]no feasible trial: nothing exported[/]")
            return
        console.print(self.exported_line(device))
        verdict = self.verdict()
        if verdict:
            console.print(verdict)
        console.print(f"plan file: [bold]{self.export_path}[/]")
        curve = curve_lines(study_budget_curve(self.trials, device.budget_bytes))
        if len(self.trials) > 1 and curve:
            console.print("budget curve (best proxy accuracy within each budget):\n" + "\n".join(curve))

    def _header(self) -> str:
        if self.search != "optuna":
            return f"\n{self.search} plan in {self.wall_s:.0f} s"
        states: dict[str, int] = {}
        for r in self.trials:
            states[r.state] = states.get(r.state, 0) + 1
        return (f"\nstudy [bold]{self.study_name}[/] in {redact_url(self.storage or '')}: {len(self.trials)} "
                f"trials ({', '.join(f'{v} {k}' for k, v in sorted(states.items()))}), {self.n_new} new, "
                f"{self.wall_s:.0f} s")

    def table(self, device: SummaryDevice, code: PlanCode) -> Any:
        from rich.table import Table

        lm = self.loss == "token"
        steps = f" at {self.refit_steps} steps" if self.refit_steps else ""
        title = (f"Plans (training budget {_mb(device.budget_bytes)} MB on {device.name}: the process may "
                 f"use {device.process_budget_mb:.0f} MB, runtime {device.runtime_mb:.0f} MB)")
        caption = ("the front by proxy accuracy, with the exported plan, the best plain-only plan, the best recomputed one and the "
                   "refit references; plan: one code per candidate layer, input to output: - frozen, F full "
                   "backprop, .8 ASI at explained variance 0.8, .8b the same with the batch mode kept whole, "
                   "L4 LoRA rank 4, L4.8 LoRA + ASI, R a block recomputed (- kept); peak MB: the training step (tensors and kernel copies); "
                   "process MB: the device process (runtime + step + 24 MB); proxy: the trial's own (short) "
                   "training; val loss: held-out cross-entropy " + ("per token " if lm else "")
                   + "after the refit, else the trial's")
        table = Table(title=title, caption=caption)
        cols = ["trial", "role", "proxy acc", f"refit acc{steps}", "val loss"] + (["perplexity"] if lm else []) + [
            "lr", "peak MB", "process MB", "GFLOP/step", "device s/step", "plan"]
        for col in cols:
            table.add_column(col)
        for role, r, ref in self.rows():
            if r is not None:
                lr = r.hparams.get("lr")
                loss = r.refit_val_loss if r.refit_val_loss is not None else r.val_loss
                cells = [str(r.number), role, _acc(r.val_accuracy), _acc(r.refit_accuracy), _acc(loss)]
                peak, flops, choices = r.predicted_peak_bytes, r.flops, r.choices
            else:
                lr = (ref.get("hparams") or {}).get("lr")
                loss = ref.get("val_loss")
                cells = ["-", role, "-", _acc(ref.get("accuracy")), _acc(loss)]
                peak, flops, choices = ref["peak_bytes"], ref.get("flops"), ref.get("choices") or {}
            if lm:
                cells.append(_perplexity(loss))
            cells += ["-" if lr is None else f"{lr:.3g}", _mb(peak),
                      _mb(device.process_peak(peak).total_bytes),
                      "-" if flops is None else f"{flops / 1e9:.2f}",
                      "-" if flops is None else f"{device.step_time_s(flops):.2f}", code(choices)]
            table.add_row(*cells)
        return table

    def exported_line(self, device: SummaryDevice) -> str:
        """The exported plan (a row of the table) against the best plain-only plan and the
        references, on one line."""
        best = self.best
        refit = best.refit_accuracy is not None
        acc = best.refit_accuracy if refit else best.val_accuracy
        line = (f"exported plan (trial {best.number}): {'refit' if refit else 'proxy'} acc {acc:.3f} at "
                f"{_mb(best.predicted_peak_bytes)} MB (process "
                f"{_mb(device.process_peak(best.predicted_peak_bytes).total_bytes)} of "
                f"{device.process_budget_mb:.0f} MB)")
        loss = best.refit_val_loss if refit else best.val_loss
        if self.loss == "token" and loss is not None:
            line += f" (val loss {loss:.3f} per token, perplexity {_perplexity(loss)})"
        if best.measured_activation_bytes is not None and best.predicted_activation_bytes is not None:
            line += (f"; saved activations predicted {best.predicted_activation_bytes / MB:.2f} MB, measured "
                     f"{best.measured_activation_bytes / MB:.2f} MB")
        plain = self.best_plain
        if plain is not None and plain.number != best.number:
            pacc = plain.refit_accuracy if plain.refit_accuracy is not None else plain.val_accuracy
            line += f"; best plain-only plan that fits (trial {plain.number}): {pacc:.3f}"
        ref = (self.references or {}).get("plain reference")
        if ref is not None:
            line += f"; gap to the unconstrained plain reference {ref['accuracy'] - acc:+.3f}"
        return line

    def verdict(self) -> str | None:
        """Whether the study paid at this budget: the exported plan against the best plain-only
        plan that fits (what an engineer trains by hand), beyond the noise of the validation set:
        2 standard errors of the difference of two accuracies on val_count images (binomial). One
        seed's noise is larger still: docs/BENCHMARKS.md measures it. None for the knapsack
        planner (nothing to compare in the run)."""
        best, plain = self.best, self.best_plain
        if self.search != "optuna" or best is None:
            return None
        if plain is None:
            return "the search pays here: no plain-only plan fits the budget, so training needs ranks or recomputation"
        if plain.number == best.number:
            return ("[yellow]the search did not pay here[/]: the exported plan is the best plain-only plan that fits "
                    "(training the last layers that fit, as by hand, with the study's lr)")
        gap = self._gap(best, plain)
        if gap is None:
            return None
        line = self._gap_line(gap, f"the best plain-only plan that fits (trial {plain.number})")
        exact = self.best_exact
        if exact is not None and exact.number == best.number:
            return line + ("; the exported plan trains plainly with blocks recomputed (exact: no ranks, "
                           "torch.utils.checkpoint by hand does the same)")
        if exact is not None and (vs := self._gap(best, exact)) is not None:
            line += "; " + self._gap_line(vs, f"the best plan with blocks recomputed and no ranks (trial {exact.number})")
        return line

    def _gap(self, best: TrialRecord, other: TrialRecord) -> tuple[float, str, float | None] | None:
        """(best's accuracy minus other's, "refit"/"proxy", 2 standard errors of that difference
        on val_count images, None without a count)."""
        refit = best.refit_accuracy is not None and other.refit_accuracy is not None
        acc = best.refit_accuracy if refit else best.val_accuracy
        oacc = other.refit_accuracy if refit else other.val_accuracy
        if acc is None or oacc is None:
            return None
        n = self.val_count
        noise = 2 * math.sqrt((acc * (1 - acc) + oacc * (1 - oacc)) / n) if n else None
        return acc - oacc, "refit" if refit else "proxy", noise

    def _gap_line(self, gap: tuple[float, str, float | None], against: str) -> str:
        diff, kind, noise = gap
        if noise is None:
            return f"exported plan against {against}: {diff:+.3f} ({kind} accuracy)"
        if diff > noise:
            return (f"the search pays here: {diff:+.3f} {kind} accuracy over {against}, beyond 2 standard errors "
                    f"({noise:.3f}) of {self.val_count} validation images")
        return (f"[yellow]the search did not pay here[/]: {diff:+.3f} {kind} accuracy over {against} is within "
                f"2 standard errors ({noise:.3f}) of {self.val_count} validation images: that plan is as good a choice")


def study_budget_curve(records: Sequence[TrialRecord], budget_bytes: int) -> list[BudgetPoint]:
    """The curve at every distinct predicted peak of a complete trial and at the device budget
    (proxy accuracy: every trained trial has one)."""
    peaks = {int(r.predicted_peak_bytes) for r in records
             if r.state == "complete" and r.predicted_peak_bytes is not None}
    return budget_curve(records, sorted(peaks | {int(budget_bytes)}))


def curve_lines(points: Sequence[BudgetPoint], n: int = 5) -> list[str]:
    """A few points of the curve (evenly spread, the last always), one line each."""
    if not points:
        return []
    idx = sorted({round(i * (len(points) - 1) / max(n - 1, 1)) for i in range(min(n, len(points)))})
    exact = any(p.exact_accuracy != p.plain_accuracy for p in points)  # a study that recomputed
    return [f"  {points[i].budget_bytes / MB:9.2f} MB: plain {_acc(points[i].plain_accuracy)}, "
            + (f"plain + recompute {_acc(points[i].exact_accuracy)}, " if exact else "")
            + f"with ranks {_acc(points[i].any_accuracy)}" for i in idx]


def _mb(nbytes: float | None) -> str:
    """Megabytes, with a decimal below 10 MB (small budgets)."""
    if nbytes is None:
        return "-"
    v = nbytes / MB
    return f"{v:.1f}" if v < 10 else f"{v:.0f}"


def _acc(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _perplexity(loss: float | None) -> str:
    return "-" if loss is None else f"{math.exp(min(loss, 700.0)):.2f}"
