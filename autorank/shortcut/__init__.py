"""ASI / HOSVD shortcut layers and lean companions (CNN: lean; language model: lean_llm): what runs
on the device (torch only).

Every layer here subclasses ShortcutLayer (autorank.shortcut.base): the one interface the plan and
the cost model know them by. ASI / HOSVD layers are TuckerLayers (they save a compressed input).
"""

from .base import BATCH_NORMS, ShortcutLayer, TuckerLayer
from .layers import ASIConv2d, ASIFactorizer, ASILinear, HOSVDConv2d, HOSVDFactorizer, HOSVDLinear
from .lora import LoRALinear
from .lean import FrozenBatchNorm2d, FrozenConv2d, FrozenLinear, PackedReLU, pack_bits, unpack_bits
from .lean_llm import LeanSwiGLU, is_silu, swiglu
from .tucker import hosvd_ranks, mode_product, tucker_core, tucker_reconstruct

__all__ = [
    "BATCH_NORMS",
    "ShortcutLayer",
    "TuckerLayer",
    "ASIConv2d",
    "ASIFactorizer",
    "ASILinear",
    "HOSVDConv2d",
    "HOSVDFactorizer",
    "HOSVDLinear",
    "LoRALinear",
    "FrozenBatchNorm2d",
    "PackedReLU",
    "FrozenConv2d",
    "FrozenLinear",
    "LeanSwiGLU",
    "is_silu",
    "swiglu",
    "hosvd_ranks",
    "tucker_reconstruct",
    "tucker_core",
    "mode_product",
    "pack_bits",
    "unpack_bits",
]
