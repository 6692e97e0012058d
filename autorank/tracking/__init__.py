"""Tracking: MLflow runs (parent per study, nested per trial) and the front's table and plots."""

from autorank.tracking.mlflow_tracker import MlflowTracker

__all__ = ["MlflowTracker"]
