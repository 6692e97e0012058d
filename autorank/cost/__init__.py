"""Cost model: bytes saved for backward (measured and predicted), FLOPs and peak training memory."""

from autorank.cost.measure import SavedBytes, measure_saved_bytes
from autorank.cost.saved import SavedBytesPrediction, predict_saved_bytes

__all__ = ["SavedBytes", "SavedBytesPrediction", "measure_saved_bytes", "predict_saved_bytes"]
