"""Target device profiles: how much memory training may use, and how fast the device computes.

Each option of the `device` config group (conf/device/*.yaml) builds one `DeviceProfile` with
`hydra.utils.instantiate`; the YAML holds the source of every figure.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from autorank.errors import ConfigError
from autorank.cost.process import FIRST_STEP_OVERHEAD_BYTES, ProcessPrediction
from autorank.units import MB


@dataclass
class DeviceProfile:
    """RAM, what the OS keeps of it, what the training process's runtime holds, and sustained
    fp32 speed.

    The process may use `ram_mb - os_mb` (process_budget_mb). Of that, the runtime (interpreter,
    torch and autorank imported, the model's objects: measured for the torch build the device's
    users get, `runtime_mb`) and the first training step's overhead (autorank.cost.process) are
    spoken for; the training tensors may use the rest: the training budget the search enforces,
    `ram_mb - os_mb - runtime_mb - overhead`. `budget_mb` overrides that training budget
    (`device.budget_mb=...`).
    """

    name: str
    ram_mb: float
    os_mb: float
    runtime_mb: float
    gflops_fp32: float
    budget_mb: float | None = None
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        figures = {"ram_mb": self.ram_mb, "os_mb": self.os_mb, "runtime_mb": self.runtime_mb,
                   "gflops_fp32": self.gflops_fp32, "budget_mb": 1.0 if self.budget_mb is None else self.budget_mb}
        bad = {k: v for k, v in figures.items()
               if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)}
        if bad:
            raise ConfigError(f"device {self.name!r}: {', '.join(f'{k}={v!r}' for k, v in bad.items())} "
                              "must be finite numbers")
        if self.ram_mb <= 0 or self.os_mb < 0 or self.runtime_mb < 0 or self.gflops_fp32 <= 0:
            raise ConfigError(f"device {self.name!r}: ram_mb, gflops_fp32 must be > 0, os_mb and runtime_mb >= 0")
        if self.effective_budget_mb <= 0:
            raise ConfigError(
                f"device {self.name!r}: training budget {self.effective_budget_mb:.0f} MB is not positive "
                f"(ram_mb={self.ram_mb} - os_mb={self.os_mb} - runtime_mb={self.runtime_mb} - first-step "
                f"overhead {FIRST_STEP_OVERHEAD_BYTES / MB:.0f} MB; budget_mb={self.budget_mb})"
            )

    def with_model_runtime(self, model: str, extra_mb: float, source: str = "") -> DeviceProfile:
        """This device running `model`, whose library adds `extra_mb` to the runtime (the model
        config's `runtime_mb`): the runtime grows by that much and the training budget shrinks by
        it (unless `budget_mb` sets the training budget). The source of the sum names both parts."""
        if isinstance(extra_mb, bool) or not isinstance(extra_mb, (int, float)) or not math.isfinite(extra_mb) \
                or extra_mb < 0:
            raise ConfigError(f"model {model!r}: runtime_mb={extra_mb!r} must be a finite number >= 0 "
                              "(MB its library adds to the device runtime)")
        if extra_mb == 0:
            return self
        base = self.sources.get("runtime_mb", "measured")
        sources = {**self.sources, "runtime_mb": f"{self.runtime_mb:g} MB ({base}) + {extra_mb:g} MB for "
                                                 f"{model} ({source or 'model config'})"}
        return dataclasses.replace(self, runtime_mb=float(self.runtime_mb) + float(extra_mb), sources=sources)

    @property
    def process_budget_mb(self) -> float:
        """What the OS leaves for the training process (its whole resident memory)."""
        return float(self.ram_mb - self.os_mb)

    @property
    def effective_budget_mb(self) -> float:
        """The training tensors' budget (module doc)."""
        if self.budget_mb is not None:
            return float(self.budget_mb)
        return float(self.ram_mb - self.os_mb - self.runtime_mb) - FIRST_STEP_OVERHEAD_BYTES / MB

    @property
    def budget_bytes(self) -> int:
        """Training memory budget in bytes (MiB = 2**20 bytes)."""
        return int(self.effective_budget_mb * MB)

    def process_peak(self, training_peak_bytes: int) -> ProcessPrediction:
        """The training process's predicted peak for a plan whose training step peaks at
        `training_peak_bytes` (tensors and kernel copies: autorank.search.cost.PlanCost.peak)."""
        return ProcessPrediction.from_runtime(int(self.runtime_mb * MB), int(training_peak_bytes),
                                              self.sources.get("runtime_mb", "measured"))

    def step_time_s(self, flops: float) -> float:
        """Predicted seconds for `flops` floating-point operations at the sustained fp32 rate."""
        return float(flops) / (self.gflops_fp32 * 1e9)

    def fits(self, peak_bytes: int) -> bool:
        return peak_bytes <= self.budget_bytes

    def summary(self) -> str:
        return (
            f"{self.name}: {self.ram_mb:.0f} MB RAM - OS {self.os_mb:.0f} MB = {self.process_budget_mb:.0f} MB "
            f"for the process; runtime {self.runtime_mb:.0f} MB, training budget {self.effective_budget_mb:.0f} MB, "
            f"{self.gflops_fp32:g} GFLOP/s fp32"
        )
