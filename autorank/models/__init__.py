"""Model factories the plan file names, and the cuts the workload makes (torch/torchvision only).

A plan file records its model as `{"factory": "autorank.models:mcunet_like", "kwargs": {...}}`;
`autorank.plan.build_model_from_factory` rebuilds it on the device with torch alone. Plans written
before this package existed name `autorank.workload.models:...`: FACTORY_ALIASES maps them here.
"""

from autorank.models.factories import (
    InvertedResidual,
    classifier_name,
    mcunet_like,
    mobilenet_v2,
    replace_head,
    resnet18,
    small_cnn,
)
from autorank.models.spec import FACTORY_ALIASES, FACTORY_MODULE, ModelSpec, factory_path
from autorank.models.split import cut_name, flatten_blocks, split_at_first_trained, trained_module_names

FACTORIES = ("small_cnn", "mcunet_like", "mobilenet_v2", "resnet18")

__all__ = [
    "FACTORIES", "FACTORY_ALIASES", "FACTORY_MODULE", "InvertedResidual", "ModelSpec", "classifier_name",
    "cut_name", "factory_path", "flatten_blocks", "mcunet_like", "mobilenet_v2", "replace_head",
    "resnet18", "small_cnn", "split_at_first_trained", "trained_module_names",
]
