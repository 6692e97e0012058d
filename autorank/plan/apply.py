"""Apply a plan to a model in place, peft-style, and undo it exactly.

Forward order is taken as registration order (`model.named_modules()`): right for
nn.Sequential-style nets (MobileNetV2, MCUNet, the workload's block-sequential models). Where a
module is registered in one place and run in another (torchvision ResNet's BasicBlock registers
`downsample` after `conv2` and calls its one `relu` twice) the region is only approximate: a
module that runs inside the region but is registered before its start keeps its plain form (it
is still exact, it just saves more), and one registered inside it but run before it gets a lean
companion that saves nothing there because no gradient flows through it.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from autorank.errors import PlanError
from autorank.plan.plan import Choice, Plan, check_fingerprint, original_modules
from autorank.shortcut import BATCH_NORMS, lean, lean_llm

_STATE_ATTR = "_autorank_plan_state"  # on a model with a plan applied: what remove_plan undoes
_RELU_TYPES = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
# Hugging Face MLPs whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x)) (read in
# transformers 5.24's modeling files), matched by class name: no transformers import here. With a
# SiLU act_fn they take lean_llm.LeanSwiGLU (GemmaMLP, the same forward with GELU, does not).
SWIGLU_MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


def candidate_layers(model: nn.Module) -> list[str]:
    """Names of the conv and linear layers, in forward (registration) order."""
    return [name for name, m in original_modules(model) if isinstance(m, (nn.Conv2d, nn.Linear))]


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in original_modules(model) if n and next(m.children(), None) is None]


def trained_region(model: nn.Module, plan: Plan) -> list[str]:
    """Leaf module names from the first trained layer on (registration order); [] if none trains."""
    trained = set(plan.trained_layers())
    leaves = _leaves(model)
    for i, (name, _) in enumerate(leaves):
        if name in trained:
            return [n for n, _ in leaves[i:]]
    return []


def _check_names(model: nn.Module, plan: Plan) -> None:
    candidates = set(candidate_layers(model))
    modules = dict(original_modules(model))
    for name, choice in plan.layers.items():
        if choice.method.scope == "module" and name in modules:
            continue  # a block-scoped method (recompute) names any module; it checks the rest
        if name not in candidates:
            raise PlanError(f"plan names layer {name!r}, which is not a conv/linear layer of this model "
                            f"(its conv/linear layers: {', '.join(candidate_layers(model)[-4:])}, ...): "
                            "use the model the plan was made for, or make the plan again for this model")


def check_choices(model: nn.Module, plan: Plan) -> None:
    """Every number of the plan's choices against the module it names, before anything is built:
    PlanError naming the layer. Each method checks its own (autorank.methods: `Method.check`):
    - lora: a linear layer, rank at most the larger of its in and out features (a LoRA rank
      makes two matrices of rank x in and out x rank);
    - asi (and lora's +asi): 4 ranks for a conv (batch, channels, height, width), at least 2 for a
      linear layer. An ASI rank above its mode's size costs nothing: it is clipped to the
      input's size when the layer runs (and by the cost model);
    - recompute: a block (a module holding layers)."""
    _check_names(model, plan)
    modules = dict(original_modules(model))
    for name, choice in plan.layers.items():
        choice.method.check(modules[name], choice, name)


def _wrap(module: nn.Module, choice: Choice, name: str) -> nn.Module:
    return choice.method.build(module, choice, name)


def _wrap_modules(model: nn.Module, plan: Plan) -> list[tuple[str, nn.Module]]:
    """Wrap the modules a block-scoped method names (recompute), after every other swap: the
    wrapper takes the block's submodules as they are then; the deepest first, so a block inside
    another is wrapped before its parent takes it. (name, original) per swap."""
    swaps = []
    named = [(n, c) for n, c in plan.layers.items() if c.method.scope == "module"]
    for name, choice in sorted(named, key=lambda nc: -nc[0].count(".")):
        module = model.get_submodule(name)
        new = _wrap(module, choice, name)
        if new is not module:
            _set_submodule(model, name, new)
            swaps.append((name, module))
    return swaps


def _lean_companion(module: nn.Module, plan: Plan, trained: bool) -> nn.Module | None:
    if isinstance(module, nn.BatchNorm2d) and plan.bn == "frozen":
        return lean.FrozenBatchNorm2d(module)
    if isinstance(module, _RELU_TYPES):
        return lean.PackedReLU(module)
    if not trained and type(module) is nn.Conv2d:
        return lean.FrozenConv2d(module)
    if not trained and type(module) is nn.Linear:
        return lean.FrozenLinear(module)
    return None


def is_swiglu_mlp(module: nn.Module) -> bool:
    """A known SwiGLU MLP (SWIGLU_MLP_CLASSES) with a SiLU act_fn: LeanSwiGLU computes its forward."""
    act = getattr(module, "act_fn", None)
    return type(module).__name__ in SWIGLU_MLP_CLASSES and isinstance(act, nn.Module) and lean_llm.is_silu(act)


def _lean_containers(model: nn.Module, region: set[str]) -> list[tuple[str, nn.Module]]:
    """Swap each SwiGLU MLP whose gate projection is in the region (so gate(x) needs a gradient)
    for a LeanSwiGLU; (name, original) per swap. Run after the leaves' swaps: the companion takes
    the MLP's submodules as they are then (wrapped or not), and remove_plan, undoing the swaps in
    reverse, puts the MLP back before its leaves."""
    swaps = []
    for name, module in list(model.named_modules()):
        if name and is_swiglu_mlp(module) and f"{name}.gate_proj" in region:
            _set_submodule(model, name, lean_llm.LeanSwiGLU(module))
            swaps.append((name, module))
    return swaps


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def apply_plan(model: nn.Module, plan_or_path: Plan | str | Path, *, strict: bool = True,
               allow_untrained: bool = False) -> nn.Module:
    """Apply a plan in place and return the model.

    - asi -> ASIConv2d / ASILinear(base, ranks); hosvd -> HOSVD*(base, eps); lora ->
      LoRALinear(base, rank, asi_ranks) with the base frozen; full -> the plain layer, trained;
      frozen (or not listed) -> requires_grad False.
    - Every parameter not trained gets requires_grad False, so nothing before the first trained
      layer records a graph or saves a tensor. BN affine inside the trained region trains only
      with bn='train'.
    - lean=True: inside the trained region (after the first trained layer), BN -> FrozenBatchNorm2d
      (bn='frozen'), ReLU/ReLU6/Hardtanh -> PackedReLU, frozen conv/linear -> FrozenConv2d /
      FrozenLinear; a SwiGLU MLP (Llama's) whose gate projection is in the region -> LeanSwiGLU,
      its submodules (wrapped or not) kept under their names.
    - A block named with a block-scoped method (recompute) -> its wrapper (autorank.methods.
      recompute.Recompute), after the swaps above, its submodules kept under their names.
    strict: check the plan's fingerprint (if it has one). Names are always checked. A plan
    already applied is removed first. A plan that trains no layer is a PlanError (nothing would
    get a gradient: backward would fail later) unless allow_untrained (the cost model prices
    such plans). Every bad plan or plan file is a PlanError (a ValueError).
    """
    if isinstance(plan_or_path, Plan):
        plan = plan_or_path
    elif isinstance(plan_or_path, (str, Path)):
        plan = Plan.load(plan_or_path)
    else:
        raise PlanError(f"apply_plan takes a Plan or a plan file's path, got {type(plan_or_path).__name__}")
    if not allow_untrained and not plan.trained_layers():
        raise PlanError("the plan trains no layer (every layer it lists is frozen): fine-tuning with it "
                        "would have no gradient; train at least one layer (e.g. the classifier: full)")
    if getattr(model, _STATE_ATTR, None) is not None:
        remove_plan(model)
    if strict and plan.fingerprint is not None:
        check_fingerprint(plan.fingerprint, model)
    check_choices(model, plan)

    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    trained = set(plan.trained_layers())
    region = trained_region(model, plan)
    start = region[0] if region else None
    modules = dict(_leaves(model))
    swaps: list[tuple[str, nn.Module]] = []

    for p in model.parameters():
        p.requires_grad_(False)
    for name in region:
        module = modules[name]
        if name in trained:
            module.requires_grad_(True)
            new = _wrap(module, plan.layers[name], name)
        else:
            if plan.bn == "train" and isinstance(module, BATCH_NORMS):
                module.requires_grad_(True)
            new = _lean_companion(module, plan, trained=False) if plan.lean and name != start else None
        if new is not None and new is not module:
            _set_submodule(model, name, new)
            swaps.append((name, module))
    if plan.lean:
        swaps += _lean_containers(model, set(region))
    swaps += _wrap_modules(model, plan)
    setattr(model, _STATE_ATTR, {"plan": plan, "swaps": swaps, "requires_grad": requires_grad})
    return model


def remove_plan(model: nn.Module) -> nn.Module:
    """Undo apply_plan: the original modules and requires_grad flags come back exactly (the
    wrappers held the originals as base_layer, nothing was copied)."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        return model
    for name, original in reversed(state["swaps"]):
        _set_submodule(model, name, original)
    for p, flag in state["requires_grad"]:
        p.requires_grad_(flag)
    delattr(model, _STATE_ATTR)
    return model


def finetune_mode(model: nn.Module, bn_eval: bool = True) -> nn.Module:
    """Put `model` in its fine-tuning mode and return it: `model.train()` (dropout active), then,
    when bn_eval, every BatchNorm layer back in eval mode (running statistics used and frozen).

    This is the mode the cost model and the workload's fine-tuning assume; a plan applied or not
    makes no difference (a FrozenBatchNorm2d's base_layer is a BatchNorm and is set too)."""
    model.train()
    if bn_eval:
        for m in model.modules():
            if isinstance(m, BATCH_NORMS):
                m.eval()
    return model


def applied_plan(model: nn.Module) -> Plan | None:
    """The plan currently applied to `model`, if any."""
    state = getattr(model, _STATE_ATTR, None)
    return state["plan"] if state else None
