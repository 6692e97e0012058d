"""Fine-tune with an exported plan on the device, with torch alone.

    autorank-device PLAN CHECKPOINT DATA [--epochs 1] [--lr 0.01] [--batch-size B] [--out W]
    python -m autorank.device PLAN CHECKPOINT DATA ...          (the same)

PLAN        a plan file from `python -m autorank` / `python -m autorank.export` (YAML or JSON)
CHECKPOINT  the base model's state dict (torch.save(model.state_dict())), e.g. the cached
            checkpoint the study used (its path is in the MLflow parent run's config). Every key
            must fit the model built here; only a classifier head of another shape (the upstream
            head of a pretraining checkpoint) is skipped, on purpose and reported: that layer keeps
            its fresh initialisation. Anything else that does not fit is an error.
DATA        a .pt file holding the training tensors: a dict {"x": float (N, C, H, W), "y": long (N,)}
            or a tuple (x, y), made with torch.save; optional "x_val"/"y_val" (both) for an accuracy

The model comes from the plan's meta.model ({"factory": "module:function", "kwargs": {...}},
written by the study; autorank.models' factories import only torch/torchvision) or from --model
module:function --model-kwargs JSON. Needs `pip install autorank` only: imports no Hydra, Optuna,
Lightning or MLflow.

Trains in the fine-tuning mode the search costed (autorank.plan.finetune_mode: train mode, so
dropout is live; BatchNorm in eval mode) and prints the saved-activation bytes measured on one
forward of the model with the plan applied against predict_saved_bytes(base model, batch, plan)
(the workload's convention: model activations only, the loss's few bytes not included).
--out writes the fine-tuned base-model weights (plan removed: the plain model's keys) atomically.
Bad input (a missing or invalid file, a plan that does not fit the model) prints `error: ...` on
stderr and exits with status 2.
"""

from autorank.device.inputs import BadInput
from autorank.device.runner import main, parse_args, run

__all__ = ["BadInput", "main", "parse_args", "run"]
