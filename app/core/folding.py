"""Batch normalisation folded into the convolution that feeds it, for inference.

In eval mode a ``BatchNorm2d`` is a fixed per-channel affine map, so a convolution followed by
one is a single convolution with scaled weights and a bias (``fuse_conv_bn_eval``). Why: on the
CPU at the service's batch sizes (4-32 CIFAR images) each of the ResNets' separate batch-norm
calls costs time on the batch worker's serial path; folded, the forward pass does one op per
pair instead of two. The result is the same function up to float rounding (logits move by
~1e-6 of their size), which ``tests/core/test_folding.py`` bounds.

Pairs are found in the model's traced graph (``torch.fx``), not by attribute names, so that only
a convolution whose one consumer is the batch norm is folded; a model that cannot be traced, or
is in training mode, is left as it is. The modules keep their names: each folded batch norm
becomes an ``nn.Identity``, whose output is the folded convolution's, so a forward hook on it
reads what it read before; a convolution named in ``keep`` (a feature layer read *before* its
normalisation) is not folded.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _traced(model: nn.Module) -> fx.Graph | None:
    """The model's graph, or None for a model ``torch.fx`` cannot trace (data-dependent
    control flow): such a model is run unfolded."""
    try:
        return fx.symbolic_trace(model).graph
    except Exception:  # any tracing failure only means "do not fold"
        return None


def _foldable_pairs(
    model: nn.Module, graph: fx.Graph, keep: Collection[str]
) -> list[tuple[str, str]]:
    """(convolution, batch norm) module names where the batch norm's only input is the
    convolution's output, which nothing else reads, each module called once."""
    modules = dict(model.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs = []
    for node in graph.nodes:
        norm = modules.get(str(node.target)) if node.op == "call_module" else None
        if not isinstance(norm, nn.BatchNorm2d) or len(node.args) != 1 or node.kwargs:
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node) or source.op != "call_module":
            continue
        conv_name, norm_name = str(source.target), str(node.target)
        conv = modules.get(conv_name)
        if (
            isinstance(conv, nn.Conv2d)
            and len(source.users) == 1
            and calls[conv_name] == calls[norm_name] == 1
            and conv_name not in keep
            and not conv.training
            and not norm.training
            and norm.running_mean is not None
            and norm.running_var is not None
        ):
            pairs.append((conv_name, norm_name))
    return pairs


def fold_batch_norms(model: nn.Module, keep: Collection[str] = ()) -> list[str]:
    """Fold each batch norm of ``model`` (in eval mode) into the convolution that feeds it, in
    place; the names of the batch norms folded (none for a model in training mode or one that
    cannot be traced)."""
    if model.training:
        return []
    graph = _traced(model)
    if graph is None:
        return []
    folded = []
    with torch.no_grad():
        for conv_name, norm_name in _foldable_pairs(model, graph, keep):
            conv = model.get_submodule(conv_name)
            norm = model.get_submodule(norm_name)
            assert isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d)
            _set_module(model, conv_name, fuse_conv_bn_eval(conv, norm))
            _set_module(model, norm_name, nn.Identity())
            folded.append(norm_name)
    return folded
