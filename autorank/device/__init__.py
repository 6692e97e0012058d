"""Fine-tune with an exported plan on the device, with torch alone.

    autorank-device PLAN CHECKPOINT DATA [--epochs 1] [--lr 0.01] [--batch-size B] [--out W]
    python -m autorank.device PLAN CHECKPOINT DATA ...          (the same)

PLAN        a plan file from `python -m autorank` / `python -m autorank.export` (YAML or JSON)
CHECKPOINT  the base model's state dict (torch.save(model.state_dict())), e.g. the cached
            checkpoint the study used (its path is in the MLflow parent run's config). Every key
            must fit the model built here; only a classifier head of another shape (the upstream
            head of a pretraining checkpoint) is skipped, on purpose and reported: that layer keeps
            its fresh initialisation. Anything else that does not fit is an error.
DATA        a .pt file holding the training tensors: a dict {"x": (N, C, H, W) float, or uint8 images
            normalised as the search's data, "y": long (N,)} or a tuple (x, y), made with
            torch.save; optional "x_val"/"y_val" (both) for an accuracy. Memory-mapped and read batch
            by batch. Or an image folder ROOT/<class>/<image> (ROOT/train and ROOT/val for a
            validation split), decoded batch by batch with Pillow (autorank.device.data).

The model comes from the plan's meta.model ({"factory": "module:function", "kwargs": {...}},
written by the study; autorank.models' factories import only torch/torchvision) or from --model
module:function --model-kwargs JSON. Needs `pip install autorank` only: imports no Hydra, Optuna,
Lightning or MLflow.

Before training it predicts the process's peak memory (its own resident memory when ready +
the plan's training tensors + a measured first-step overhead: autorank.cost.process) and
refuses, exit 3, a plan above what the process may use (a memory cgroup's limit, else
MemAvailable); at the end it prints the measured peak beside the prediction. The console script
runs the work in a child process (autorank.device.guard), so that a kill by the kernel for want
of memory is one line and exit 4, too.

Trains in the fine-tuning mode the search costed (autorank.plan.finetune_mode: train mode, so
dropout is live; BatchNorm in eval mode) and prints the saved-activation bytes measured on one
forward of the model with the plan applied (the first training step's) against predict_saved_bytes(base model, batch, plan)
(the workload's convention: model activations only, the loss's few bytes not included).
--out writes the fine-tuned base-model weights (plan removed: the plain model's keys) atomically.
Bad input (a missing or invalid file, a plan that does not fit the model) prints `error: ...` on
stderr and exits with status 2, before any work:
- --out naming the plan, the checkpoint or the data file (by any path or link), a folder, or a
  place where no file can be created;
- a plan file treated as untrusted (autorank.plan.Plan.load): above 16 MB, or YAML aliases that
  expand past a million values, refused before a value is built; every rank checked against its
  layer (autorank.plan.check_choices) and the input shape's sizes bounded;
- the model built on the meta device first: a fingerprint that does not match, or weights above
  the memory this process may use, refused before a byte of weights is allocated; a batch whose
  inputs alone exceed that memory, before it is read;
- NaN or inf in the data's x / x_val or in the checkpoint's tensors (named, with the count);
  0-d, sparse, meta or complex tensors; class labels of another shape than (N,);
- --lr above 1000 (or not a finite number > 0), a seed outside what torch takes, counts beyond
  64 bits. Ctrl-C is one line and exit status 130; --out is then not written.
"""

import importlib

__all__ = ["BadInput", "main", "parse_args", "run"]

# Lazy: the supervisor (autorank.device.guard, the console script) imports this package and must
# not pay for torch; `from autorank.device import main` still gets the runner's in-process main.
_HOMES = {"BadInput": "autorank.device.inputs", "main": "autorank.device.runner",
          "parse_args": "autorank.device.options", "run": "autorank.device.runner"}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'autorank.device' has no attribute {name!r}")
