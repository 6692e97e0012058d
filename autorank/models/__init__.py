"""Model factories the plan file names, and the cuts the workload makes (torch/torchvision only;
tiny_llama imports Hugging Face transformers inside its factory: pip install 'autorank[llm]').

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
from autorank.models.llm import tiny_llama
from autorank.models.spec import FACTORY_ALIASES, FACTORY_MODULE, ModelSpec, factory_path
from autorank.models.split import (cut_name, flatten_blocks, split_at_first_trained, trained_module_names,
                                   transformer_blocks)
from autorank.models.vit import SelfAttention, vit_tiny

FACTORIES = ("small_cnn", "mcunet_like", "mobilenet_v2", "resnet18", "vit_tiny", "tiny_llama")

__all__ = [
    "FACTORIES", "FACTORY_ALIASES", "FACTORY_MODULE", "InvertedResidual", "ModelSpec", "classifier_name",
    "cut_name", "factory_path", "flatten_blocks", "mcunet_like", "mobilenet_v2", "replace_head",
    "resnet18", "SelfAttention", "small_cnn", "split_at_first_trained", "tiny_llama", "trained_module_names",
    "transformer_blocks", "vit_tiny",
]
