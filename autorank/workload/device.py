"""Target device profiles: how much memory training may use, and how fast the device computes.

Each option of the `device` config group (conf/device/*.yaml) builds one `DeviceProfile` with
`hydra.utils.instantiate`; the YAML holds the source of every figure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from autorank.errors import ConfigError
from autorank.units import MB


@dataclass
class DeviceProfile:
    """RAM, the part of it the OS and the Python/torch runtime keep, and sustained fp32 speed.

    `budget_mb` overrides the training budget (`device.budget_mb=...`); left None it is
    `ram_mb - reserved_mb`.
    """

    name: str
    ram_mb: float
    reserved_mb: float
    gflops_fp32: float
    budget_mb: float | None = None
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        figures = {"ram_mb": self.ram_mb, "reserved_mb": self.reserved_mb, "gflops_fp32": self.gflops_fp32,
                   "budget_mb": 1.0 if self.budget_mb is None else self.budget_mb}
        bad = {k: v for k, v in figures.items()
               if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)}
        if bad:
            raise ConfigError(f"device {self.name!r}: {', '.join(f'{k}={v!r}' for k, v in bad.items())} "
                              "must be finite numbers")
        if self.ram_mb <= 0 or self.reserved_mb < 0 or self.gflops_fp32 <= 0:
            raise ConfigError(f"device {self.name!r}: ram_mb, gflops_fp32 must be > 0, reserved_mb >= 0")
        if self.effective_budget_mb <= 0:
            raise ConfigError(
                f"device {self.name!r}: training budget {self.effective_budget_mb} MB is not positive "
                f"(ram_mb={self.ram_mb}, reserved_mb={self.reserved_mb}, budget_mb={self.budget_mb})"
            )

    @property
    def effective_budget_mb(self) -> float:
        return float(self.budget_mb) if self.budget_mb is not None else float(self.ram_mb - self.reserved_mb)

    @property
    def budget_bytes(self) -> int:
        """Training memory budget in bytes (MiB = 2**20 bytes)."""
        return int(self.effective_budget_mb * MB)

    def step_time_s(self, flops: float) -> float:
        """Predicted seconds for `flops` floating-point operations at the sustained fp32 rate."""
        return float(flops) / (self.gflops_fp32 * 1e9)

    def fits(self, peak_bytes: int) -> bool:
        return peak_bytes <= self.budget_bytes

    def summary(self) -> str:
        return (
            f"{self.name}: {self.ram_mb:.0f} MB RAM, {self.reserved_mb:.0f} MB reserved, "
            f"budget {self.effective_budget_mb:.0f} MB, {self.gflops_fp32:g} GFLOP/s fp32"
        )
