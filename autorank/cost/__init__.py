"""Cost model: bytes saved for backward (measured and predicted), FLOPs and peak training memory.

torch (+ yaml) only: a device can predict what a plan costs before training it.
"""

from autorank.cost.flops import CUSTOM_FLOP_FORMULAS, flop_counter, qr_flops, train_step_flops
from autorank.cost.live import LivePeak, measure_peak_training, measure_peak_training_bytes
from autorank.cost.measure import SavedBytes, measure_saved_bytes
from autorank.cost.peak import PeakMemory, predict_peak_training_bytes
from autorank.cost.saved import SavedBytesPrediction, predict_saved_bytes

__all__ = [
    "CUSTOM_FLOP_FORMULAS",
    "LivePeak",
    "PeakMemory",
    "SavedBytes",
    "SavedBytesPrediction",
    "flop_counter",
    "measure_peak_training",
    "measure_peak_training_bytes",
    "measure_saved_bytes",
    "predict_peak_training_bytes",
    "predict_saved_bytes",
    "qr_flops",
    "train_step_flops",
]
