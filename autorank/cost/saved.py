"""Predict the bytes autograd saves for backward, from shapes and per-op rules.

One forward runs under torch.no_grad() (nothing is saved, BN statistics and the RNG are left as
they were: it runs on a copy and the RNG is forked). The copy is a cached meta-device shadow
(autorank.cost.meta: shapes only, milliseconds); models that need values (HOSVD_eps ranks) or
fail on meta are traced on a real deep copy, with the same rules. A TorchFunctionMode sees every
top-level torch call (F.conv2d inside nn.Conv2d, but also the functional F.adaptive_avg_pool2d
and torch.flatten in MobileNetV2's forward and ResNet's `out += identity`) and tracks which
tensors would require grad. Every op whose output would require grad creates an autograd node,
and the rules below say what that node saves. Saved tensors are keyed by the storage they keep
alive, so an inplace ReLU's result, the BN output it overwrote and the next conv's input count
once. Parameters and buffers are resident: not counted.

What autograd saves (torch 2.14, checked against saved_tensors_hooks):
  conv             input (+ weight), whatever requires grad
  linear / matmul  input if the weight requires grad (+ weight if the input does)
  batch_norm       input (+ weight, running stats); in training mode also save_mean and
                   save_invstd (C floats each; eval mode saves empty ones)
  relu, relu_      the result;  hardtanh/relu6: the input, and when inplace a clone of it
  dropout (train)  the mask: bool on CUDA (fused kernel), the input's dtype elsewhere
  max_pool2d       input + int64 indices of the output's size
  avg_pool2d, adaptive_avg_pool2d  input (adaptive to 1x1 is a mean: nothing)
  sigmoid, tanh, softmax, log_softmax: result;  silu, gelu, hardswish, hardsigmoid: input
  mul              each tensor operand whose partner requires grad
  add, sub, views, reshape, flatten, cat, mean, sum: nothing
  transformer ops (attention, layer/RMS norm, embedding, pow, rsqrt, ...): autorank.cost.seqrules
autorank.shortcut's layers (ShortcutLayer: a method's layers and the lean companions) are opaque:
the rule of the method that built them (autorank.methods: ASI/HOSVD their core and factors,
recompute the block's inputs), or a lean companion's own `saved_bytes` formula as a fresh
storage; those marked `traced` (LoRA, LeanSwiGLU) are traced op by op like any module.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from autorank.cost.fastmeta import tensors_in
from autorank.cost.meta import run_planned, storage_key
from autorank.cost.seqrules import SEQUENCE_RULES
from autorank.methods import method_of_layer
from autorank.shortcut import ShortcutLayer


@dataclasses.dataclass
class SavedBytesPrediction:
    """activation_bytes: every saved tensor (storages counted once, parameters apart).
    conv_input_bytes: the paper's figure, inputs of trained conv/linear layers only (the
    compressed size for ASI/HOSVD layers). per_module: activation bytes by the module whose
    forward saved them (first saver of a shared storage). input_saved: whether the batch itself
    is among the saved tensors (the first layer trains). unknown_ops: ops on the gradient path
    that no rule covers (counted 0: the prediction may be low)."""

    activation_bytes: int
    conv_input_bytes: int
    per_module: dict[str, int]
    input_saved: bool = False
    unknown_ops: list[str] = dataclasses.field(default_factory=list)
    # (module name, input shape, output shape, dtype) of the modules on the gradient path
    region_shapes: list[tuple] = dataclasses.field(default_factory=list, repr=False)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


_NOTHING = {
    "add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__rsub__", "__isub__",
    "neg", "__neg__", "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze",
    "unsqueeze", "permute", "transpose", "t", "contiguous", "clone", "__getitem__", "narrow", "chunk",
    "split", "cat", "concat", "stack", "mean", "sum", "expand", "expand_as", "identity", "to", "float",
    "double", "half", "bfloat16", "type_as", "detach", "flatten_", "adaptive_avg_pool2d_1x1",
}
_SAVE_RESULT = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "softmax", "log_softmax", "exp"}
_SAVE_INPUT = {"silu", "gelu", "hardswish", "hardsigmoid", "leaky_relu", "elu", "avg_pool2d"}
_BN_SIG = inspect.signature(F.batch_norm)


class _Tracer(TorchFunctionMode):
    def __init__(self, model: nn.Module, cuda: bool = False):
        super().__init__()
        self.cuda = cuda  # the device the step runs on (a meta trace stands in for it)
        self.needs = WeakIdKeyDictionary()  # tensor -> would it require grad
        self.resident = {storage_key(t) for t in itertools.chain(model.parameters(), model.buffers()) if t.numel()}
        self.saved: dict[tuple, tuple[int, str, torch.Tensor | None]] = {}
        self.fresh = itertools.count()
        self.stack: list[str] = []
        self.opaque = 0  # > 0 inside a ShortcutLayer (or our own rank SVDs): ops not traced
        self.opened: set[int] = set()  # ids of the ShortcutLayers that made the trace opaque
        self.conv_input_bytes = 0
        self.unknown: list[str] = []
        self.region_shapes: list[tuple] = []

    # -- bookkeeping -------------------------------------------------------------------------
    def need(self, t) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        return t.requires_grad or self.needs.get(t, False)

    def mark(self, out, flag: bool) -> None:
        for t in tensors_in(out):
            if isinstance(t, torch.Tensor) and flag:
                self.needs[t] = True

    def save(self, t: torch.Tensor) -> None:
        if t.untyped_storage().nbytes() == 0:
            return
        key = storage_key(t)
        if key in self.resident or key in self.saved:
            return
        self.saved[key] = (t.untyped_storage().nbytes(), self.where(), t)  # held: no pointer reuse

    def save_fresh(self, nbytes: int) -> None:
        if nbytes:
            self.saved[("fresh", next(self.fresh))] = (int(nbytes), self.where(), None)

    def where(self) -> str:
        return self.stack[-1] if self.stack else ""

    # -- modules -------------------------------------------------------------------------------
    def pre_hook(self, name):
        def hook(module, args):
            self.stack.append(name)
            if isinstance(module, ShortcutLayer) and not module.traced and self.opaque == 0:
                self.opaque += 1
                self.opened.add(id(module))
        return hook

    def post_hook(self, name):
        def hook(module, args, out):
            x = args[0] if args else None
            if id(module) in self.opened:
                self.opened.discard(id(module))
                self.opaque -= 1
                flag = any(self.need(a) for a in args) or any(p.requires_grad for p in module.parameters())
                if flag:
                    self.opaque_rule(module, args)
                self.mark(out, flag)
            if isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor) and self.need(out):
                self.region_shapes.append((name, tuple(x.shape), tuple(out.shape), x.dtype))
            self.stack.pop()
        return hook

    def opaque_rule(self, module: ShortcutLayer, args: tuple) -> None:
        """The bytes an untraced ShortcutLayer keeps: its method's rule (autorank.methods:
        `Method.saved_rule`), or, for a lean companion, its own formula as a fresh storage."""
        method = method_of_layer(module)
        if method is not None:
            method.saved_rule(self, module, args)
            return
        x = args[0]
        self.save_fresh(int(module.saved_bytes(tuple(x.shape), x.dtype)))

    # what a method's saved rule may call besides save / save_fresh
    def count_input(self, nbytes: int) -> None:
        """Add to conv_input_bytes (the trained layers' inputs, as kept)."""
        self.conv_input_bytes += int(nbytes)

    def untraced(self, fn, *args):
        """fn(*args) with the tracer looking away (a layer's own rank SVDs are no step op)."""
        self.opaque += 1
        try:
            return fn(*args)
        finally:
            self.opaque -= 1

    # -- ops -----------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.opaque:
            return out
        name = getattr(func, "__name__", "")
        tensors = tensors_in((args, kwargs))
        flag = name not in ("detach", "detach_") and any(self.need(t) for t in tensors)
        if flag and isinstance(out, (torch.Tensor, tuple, list)):
            self.rule(func, name, args, kwargs, out)
        self.mark(out, flag)
        return out

    def batch_norm_rule(self, func, x, args, kwargs) -> None:
        if func is F.batch_norm:
            b = _BN_SIG.bind(*args, **kwargs)
            b.apply_defaults()
            training, running_mean = b.arguments["training"], b.arguments["running_mean"]
        else:  # torch.batch_norm(input, weight, bias, running_mean, running_var, training, ...)
            training, running_mean = args[5], args[3]
        self.save(x)
        if training or running_mean is None:
            stat = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
            c = x.shape[1]
            self.save_fresh(2 * c * torch.empty((), dtype=stat).element_size())

    def rule(self, func, name, args, kwargs, out) -> None:
        x = args[0] if args else None
        if name in ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"):
            self.save(x)
            if len(args) > 1 and args[1].requires_grad:
                self.conv_input_bytes += _nbytes(x)
        elif name in ("linear", "matmul", "mm"):
            w = args[1] if len(args) > 1 else kwargs["weight"]
            if self.need(w):
                # a 2-D input is saved as it is (a view keeps its whole storage); more dims are
                # folded with reshape: a view of a contiguous input, else a copy
                self.save(x) if x.dim() <= 2 or x.is_contiguous() else self.save_fresh(_nbytes(x))
                if name == "linear" and w.requires_grad:
                    self.conv_input_bytes += _nbytes(x)
            if self.need(x):
                self.save(w)
        elif name in SEQUENCE_RULES:
            SEQUENCE_RULES[name](self, args, kwargs, out)
        elif name == "batch_norm":
            self.batch_norm_rule(func, x, args, kwargs)
        elif name in _SAVE_RESULT:
            self.save(out if isinstance(out, torch.Tensor) else out[0])
        elif name in ("hardtanh", "relu6", "hardtanh_", "relu6_"):
            pos = 3 if name.startswith("hardtanh") else 1  # F.hardtanh(x, min, max, inplace)
            inplace = name.endswith("_") or bool(args[pos] if len(args) > pos else kwargs.get("inplace", False))
            # hardtanh_ is an inplace clamp whose backward needs the original input: autograd
            # clones it before overwriting (a fresh storage, on top of the result's)
            self.save_fresh(_nbytes(x)) if inplace else self.save(x)
        elif name in _SAVE_INPUT:
            self.save(x)
        elif name in ("adaptive_avg_pool2d",):
            size = args[1] if len(args) > 1 else kwargs["output_size"]
            size = (size, size) if isinstance(size, int) else tuple(size)
            if tuple(s if s is not None else -1 for s in size) != (1, 1):
                self.save(x)
        elif name in ("max_pool2d", "_max_pool2d", "max_pool2d_with_indices"):
            self.save(x)
            o = out[0] if isinstance(out, tuple) else out
            self.save_fresh(o.numel() * 8)  # int64 indices
        elif name in ("dropout", "dropout_", "feature_dropout", "alpha_dropout"):
            p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
            training = args[2] if len(args) > 2 else kwargs.get("training", True)
            if training and 0 < p < 1 and x.numel():
                # CUDA runs the fused native_dropout (bool mask); the CPU multiplies by a noise
                # tensor of the input's dtype
                self.save_fresh(x.numel() * (1 if self.cuda else x.element_size()))
        elif name in ("mul", "__mul__", "__rmul__", "mul_", "__imul__"):
            a, b = args[0], args[1]
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                if self.need(a):
                    self.save(b)
                if self.need(b):
                    self.save(a)
        elif name in _NOTHING or name.startswith("__") and name.endswith("__") and name not in (
                "__matmul__", "__pow__", "__truediv__", "__div__"):
            pass
        else:
            self.unknown.append(name)


def trace_saved_bytes(model: nn.Module, example_input: torch.Tensor, cuda: bool) -> SavedBytesPrediction:
    """One no_grad forward of `model` (changed: BN statistics) under the tracer; `model` is the
    planned model itself (a shadow or a copy: see predict_saved_bytes). cuda: the device the
    step runs on (a meta trace stands in for it)."""
    return _traced_forward(model, example_input, cuda, grad=False)[0]


def trace_training_forward(model: nn.Module, example_input: torch.Tensor,
                           cuda: bool) -> tuple[SavedBytesPrediction, torch.Tensor]:
    """trace_saved_bytes with grad enabled: the forward builds autograd's graph as a training
    step does (the same rules give the same prediction), and its output is returned for a
    backward. The tracer holds no tensor once this returns."""
    return _traced_forward(model, example_input, cuda, grad=True)


def _traced_forward(model, example_input, cuda, grad):
    tracer = _Tracer(model, cuda)
    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(tracer.pre_hook(name)))
        handles.append(module.register_forward_hook(tracer.post_hook(name)))
    x = example_input.detach()
    if example_input.requires_grad:
        if grad:
            x.requires_grad_(True)
        else:
            tracer.needs[x] = True
    devices = [x.device.index or 0] if x.is_cuda else []
    try:
        with torch.random.fork_rng(devices=devices), torch.set_grad_enabled(grad), tracer:
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    per_module: dict[str, int] = {}
    for nbytes, where, _ in tracer.saved.values():
        per_module[where] = per_module.get(where, 0) + nbytes
    prediction = SavedBytesPrediction(
        activation_bytes=sum(v[0] for v in tracer.saved.values()),
        conv_input_bytes=tracer.conv_input_bytes,
        per_module=per_module,
        input_saved=storage_key(x) in tracer.saved,
        unknown_ops=sorted(set(tracer.unknown)),
        region_shapes=tracer.region_shapes,
    )
    return prediction, out


def predict_saved_bytes(model: nn.Module, example_input: torch.Tensor, plan=None) -> SavedBytesPrediction:
    """Bytes autograd would save for one training forward of `model` on `example_input`.

    plan=None: the model as it is (a plan may already be applied); a Plan (or path): applied
    to a copy. The model itself is never changed (BN statistics, warm-start state, RNG).
    The trace runs on a meta-device shadow of the model (shapes only, milliseconds); a model
    that needs values (HOSVD_eps ranks) or cannot run on meta is traced on a real deep copy."""
    return run_planned(model, plan, example_input,
                       lambda m, x: trace_saved_bytes(m, x, example_input.is_cuda))
