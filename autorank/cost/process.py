"""Peak memory of the training *process*, not only of its tensors.

    process peak = runtime + training peak + first-step overhead

- runtime: what the process holds when it is ready to train, apart from the model's weights: the
  interpreter, torch and autorank imported (code and data of the libraries, file-backed and
  anonymous), the model's Python objects. It depends on the torch build (the registry's x86 and
  aarch64 wheels bundle CUDA libraries; CPU builds are smaller) and is measured, not derived: the
  device runner reads its own resident memory when ready; a device profile carries the figure
  measured for the build its users get (docs/DEVICE.md).
- training peak: autorank.cost.peak.predict_peak_training_bytes (weights, gradients, optimizer
  state, saved activations, the batch, the step's transients), exact for the tensors, plus the
  largest plainly trained convolution's input + output, which its backward copies (kernel_bytes).
- first-step overhead: what the first training step maps or keeps beyond its tensors: the code
  pages of the kernels it runs for the first time (file-backed) and the allocator's rounding and
  fragmentation under the runner's policy (autorank.device.memory.set_allocator_policy). Measured
  on the device runner (docs/DEVICE.md) and kept here as one constant.

The data set is not counted: the runner reads it batch by batch (autorank.device.data), and the
one batch in memory is in the training tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

MB = 2**20

# Measured with the device runner (docs/DEVICE.md, "What is counted"): peak RSS minus ready RSS
# minus the predicted training peak, on plans that train no convolution plainly (x86, torch 2.13
# CPU build; mcunet_like x0.5 at 112 px, batch 128): 11-25 MB.
FIRST_STEP_OVERHEAD_BYTES = 24 * MB


@dataclass(frozen=True)
class ProcessPrediction:
    """The process's predicted peak resident memory (RSS) and its parts, in bytes. training_bytes:
    the step's tensors plus the largest plainly trained convolution's kernel copy
    (autorank.cost.peak.PeakMemory.training_bytes)."""

    runtime_bytes: int
    training_bytes: int
    overhead_bytes: int = FIRST_STEP_OVERHEAD_BYTES
    runtime_source: str = "measured in this process when ready"

    @property
    def total_bytes(self) -> int:
        return int(self.runtime_bytes + self.training_bytes + self.overhead_bytes)

    @classmethod
    def from_ready(cls, ready_rss_bytes: int, training_bytes: int, weights_bytes: int) -> "ProcessPrediction":
        """From a process that is ready to train (model built, weights loaded, plan applied):
        its resident memory holds the runtime and the weights, which the training peak counts too."""
        return cls(int(ready_rss_bytes) - int(weights_bytes), int(training_bytes))

    @classmethod
    def from_runtime(cls, runtime_bytes: int, training_bytes: int, source: str) -> "ProcessPrediction":
        """From a device profile's measured runtime and a predicted training peak."""
        return cls(int(runtime_bytes), int(training_bytes), runtime_source=source)

    def line(self) -> str:
        return (f"{self.total_bytes / MB:.0f} MB = runtime {self.runtime_bytes / MB:.0f} MB ({self.runtime_source}) "
                f"+ training {self.training_bytes / MB:.1f} MB (tensors and kernel copies) + first-step overhead "
                f"{self.overhead_bytes / MB:.0f} MB")
