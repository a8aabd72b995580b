"""Initialise a torch network from an exported ONNX graph of the same architecture.

The shipped classifier has no torch checkpoint, only its ONNX file, in which the exporter fused
every batch norm into the preceding convolution. Fine-tuning starts from those weights: each
convolution gets the fused kernel, and its batch norm is rebuilt from the statistics of the
convolution's output on real images, so the network computes the same function in eval mode
and (up to batch noise) in train mode.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn


@torch.no_grad()
def load_onnx_weights(model: nn.Module, path: Path, calibration: torch.Tensor) -> None:
    """Copy the convolutions and linear head of ``path`` into ``model``, un-fusing batch norms.

    ``calibration`` is a normalised (N, 3, H, W) batch; the ONNX convolutions must appear in the
    order of the model's convolutions (true for graphs exported from the same class).
    """
    graph = onnx.load(str(path)).graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:  # the exporter shares equal initialisers through Identity nodes
        if node.op_type == "Identity" and node.input[0] in weights:
            weights[node.output[0]] = weights[node.input[0]]
        elif node.op_type == "DequantizeLinear" and node.input[0] in weights:
            weights[node.output[0]] = _dequantized(node, weights)  # an int8 graph's weights
    if _load_by_name(model, graph, weights):
        return
    if any(isinstance(m, nn.GroupNorm) for m in model.modules()):
        _load_into_group_norms(model, path, calibration)
        return
    convs = [n for n in graph.node if n.op_type == "Conv"]
    gemm = next(n for n in graph.node if n.op_type == "Gemm")
    pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]] = []
    modules = list(model.modules())
    for i, m in enumerate(modules):
        if isinstance(m, nn.Conv2d):
            bn = modules[i + 1]
            if not isinstance(bn, nn.BatchNorm2d):
                raise ValueError("every convolution must be followed by a batch norm")
            pairs.append((m, bn))
    if len(pairs) != len(convs):
        raise ValueError(f"{path}: {len(convs)} convolutions, the model has {len(pairs)}")
    convs = _in_module_order(model, convs)
    biases = []
    for (conv, bn), node in zip(pairs, convs, strict=True):
        kernel = weights[node.input[1]]
        if kernel.shape != tuple(conv.weight.shape):
            raise ValueError(f"{path}: kernel {kernel.shape} != {tuple(conv.weight.shape)}")
        if len(node.input) < 3:
            raise ValueError(f"{path}: unfused convolutions; build the network its card names")
        conv.weight.copy_(torch.tensor(kernel))
        biases.append(torch.tensor(weights[node.input[2]]).float())
        # Identity batch norm for now: then the model is exactly the fused graph.
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)
        bn.weight.fill_(1.0)
        bn.bias.copy_(biases[-1])
    head = model.get_submodule("head")
    head.weight.copy_(torch.tensor(weights[gemm.input[1]]))
    head.bias.copy_(torch.tensor(weights[gemm.input[2]]))
    # Statistics of each bias-free convolution output on real images, through the fused net.
    stats: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        conv.register_forward_hook(
            lambda _m, _i, y, k=k: stats.__setitem__(k, (y.mean((0, 2, 3)), y.var((0, 2, 3))))
        )
        for k, (conv, _) in enumerate(pairs)
    ]
    model.eval()(calibration)
    for hook in hooks:
        hook.remove()
    for k, (_, bn) in enumerate(pairs):
        mean, var = stats[k]
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        bn.weight.copy_(torch.sqrt(var + bn.eps))
        bn.bias.copy_(biases[k] + mean)


def _scope(module_name: str) -> str:
    """The exporter's node-name scope of a module: ``features.4.shortcut.0`` ->
    ``/features/features.4/shortcut/shortcut.0`` (a container's child is named with it)."""
    segments: list[str] = []
    for part in module_name.split("."):
        if part.isdigit() and segments:
            segments.append(f"{segments[-1].split('/')[-1]}.{part}")
        else:
            segments.append(part)
    return "/" + "/".join(segments)


def _in_module_order(model: nn.Module, convs: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """The graph's convolutions in the model's order, found by their node names (a graph
    optimiser, such as the quantiser's, may reorder nodes); as they are when names do not tell."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    ordered = []
    for name in names:
        suffix = _scope(name) + "/Conv"
        found = [n for n in convs if n.name.endswith(suffix)]
        if len(found) != 1:
            return convs
        ordered.append(found[0])
    return ordered


def _dequantized(node: onnx.NodeProto, weights: dict[str, np.ndarray]) -> np.ndarray:
    """The float values of a DequantizeLinear on initialisers (per tensor or per channel)."""
    q = weights[node.input[0]].astype(np.float32)
    scale = weights[node.input[1]].astype(np.float32)
    zero = weights[node.input[2]].astype(np.float32) if len(node.input) > 2 else np.zeros(1)
    if scale.ndim == 1 and scale.size > 1:  # per channel along ``axis`` (default 1)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        shape[axis] = scale.size
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (q - zero) * scale


@torch.no_grad()
def _load_by_name(model: nn.Module, graph: onnx.GraphProto, weights: dict[str, np.ndarray]) -> bool:
    """Load a graph in which nothing was fused (a group-norm network's). True if it did.

    Convolutions and the head keep their parameter names (``model.`` is the prefix of the
    test-time view wrapper); the exporter renames each group norm's scale and shift to the
    ``Mul`` and ``Add`` after its ``InstanceNormalization``, which come in the model's order.
    """
    state = model.state_dict()
    norms = [name for name, m in model.named_modules() if isinstance(m, nn.GroupNorm)]
    scales = [n.input[1] for n in graph.node if n.op_type == "Mul" and n.input[1] in weights]
    shifts = [n.input[1] for n in graph.node if n.op_type == "Add" and n.input[1] in weights]
    if not norms or len(scales) != len(norms) or len(shifts) != len(norms):
        return False
    found = {}
    for name, scale, shift in zip(norms, scales, shifts, strict=True):
        found[f"{name}.weight"] = torch.tensor(weights[scale]).reshape(-1)
        found[f"{name}.bias"] = torch.tensor(weights[shift]).reshape(-1)
    for key, value in state.items():
        if key not in found:
            array = weights.get(key, weights.get(f"model.{key}"))
            if array is None:
                return False
            found[key] = torch.tensor(array)
        if tuple(found[key].shape) != tuple(value.shape):
            return False
    model.load_state_dict(found)
    return True


@torch.no_grad()
def _load_into_group_norms(model: nn.Module, path: Path, calibration: torch.Tensor) -> None:
    """Start a group-norm network from a batch-norm graph's weights.

    A twin with batch norms in place of the group norms is loaded as above; each group norm
    then takes its batch norm's scale and shift, so every channel leaves with the spread and
    offset the graph gave it on ``calibration``: the same function up to each image's own group
    statistics, which fine-tuning takes from there.
    """
    twin = copy.deepcopy(model)
    groups = [name for name, m in twin.named_modules() if isinstance(m, nn.GroupNorm)]
    for name in groups:
        parent, _, child = name.rpartition(".")
        norm = twin.get_submodule(name)
        setattr(twin.get_submodule(parent), child, nn.BatchNorm2d(norm.num_channels))
    load_onnx_weights(twin, path, calibration)
    twin_modules = dict(twin.named_modules())
    for name, m in model.named_modules():
        source = twin_modules[name]
        if isinstance(m, nn.GroupNorm):
            m.weight.copy_(source.weight)
            m.bias.copy_(source.bias)
        elif isinstance(m, nn.Conv2d | nn.Linear):
            m.load_state_dict(source.state_dict())


def max_abs_difference(model: nn.Module, path: Path, x: torch.Tensor) -> float:
    """Largest logit difference between ``model`` (eval) and the ONNX graph on ``x``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        got = model.eval()(x).numpy()
    return float(np.abs(got - expected).max())
