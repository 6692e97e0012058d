"""ASI / HOSVD shortcut layers and lean companions: what runs on the device (torch only)."""

from .lean import FrozenBatchNorm2d, FrozenConv2d, FrozenLinear, PackedReLU, pack_bits, unpack_bits
from .layers import ASIConv2d, ASILinear, HOSVDConv2d, HOSVDLinear
from .tucker import hosvd_ranks, mode_product, tucker_core, tucker_reconstruct

__all__ = [
    "ASIConv2d",
    "ASILinear",
    "HOSVDConv2d",
    "HOSVDLinear",
    "FrozenBatchNorm2d",
    "PackedReLU",
    "FrozenConv2d",
    "FrozenLinear",
    "hosvd_ranks",
    "tucker_reconstruct",
    "tucker_core",
    "mode_product",
    "pack_bits",
    "unpack_bits",
]
