"""A model's outputs as a flat, named list: one tensor, or a tuple, list, namedtuple or dict of them
(nested). The names are what the ONNX file calls its outputs, what parity compares one by one and
what the metadata contract lists; the order is the one the ONNX exporter flattens outputs in
(sequences in order, dicts in insertion order).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from latprune.errors import BadInput

__all__ = ["input_shape_of", "OUTPUT", "AUX_WEIGHT", "flatten_outputs", "output_names", "output_shapes",
           "classification_loss", "has_aux_outputs"]

OUTPUT = "logits"  # the name of a model's single output
# an auxiliary classifier's loss weight (PyTorch's fine-tuning tutorial for Inception v3: loss1 + 0.4 * loss2)
AUX_WEIGHT = 0.4


def input_shape_of(example_inputs: Any) -> tuple[int, int, int]:
    """(C, H, W) of ``example_inputs``, one image batch ``(N, C, H, W)``; anything else is bad input
    (the API's and the exporter's one check of what users pass)."""
    if not isinstance(example_inputs, torch.Tensor) or example_inputs.dim() != 4 or 0 in example_inputs.shape:
        got = tuple(example_inputs.shape) if isinstance(example_inputs, torch.Tensor) else type(example_inputs)
        raise BadInput(f"example_inputs must be one image batch tensor (N, C, H, W), none of them 0, got {got}")
    return tuple(int(d) for d in example_inputs.shape[1:])


def flatten_outputs(out: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """``[(name, tensor), ...]``: a single tensor is ``logits``; a tuple or list's items ``output0``,
    ``output1``, ...; a namedtuple's and a dict's by their fields and keys, nested ones joined by
    ``.``. Anything else (None, a number, a string) is refused: it cannot be an ONNX output."""
    if isinstance(out, torch.Tensor):
        return [(prefix or OUTPUT, out)]
    if isinstance(out, dict):
        items = [(str(k), v) for k, v in out.items()]
    elif isinstance(out, tuple) and hasattr(out, "_fields"):
        items = list(zip(out._fields, out))
    elif isinstance(out, (tuple, list)):
        items = [(f"output{i}", v) for i, v in enumerate(out)]
    else:
        raise BadInput(f"model output {prefix or '(top level)'} is a {type(out).__name__}: outputs must be tensors, "
                       "or tuples, lists, namedtuples or dicts of tensors")
    flat = []
    for k, v in items:
        flat += flatten_outputs(v, f"{prefix}.{k}" if prefix else k)
    return flat


@torch.no_grad()
def _run(model: nn.Module, input_shape: tuple[int, ...]) -> list[tuple[str, torch.Tensor]]:
    was_training = model.training
    param = next(model.parameters(), None)
    model.eval()
    try:
        return flatten_outputs(model(torch.zeros(1, *input_shape, device=param.device if param is not None else "cpu")))
    finally:
        model.train(was_training)


def output_names(model: nn.Module, input_shape: tuple[int, ...]) -> list[str]:
    """The names of ``model``'s outputs (eval mode, one zero image of ``input_shape``)."""
    return [n for n, _ in _run(model, input_shape)]


def output_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Each output's shape for one zero image of ``input_shape`` (eval mode), by name."""
    return {n: tuple(t.shape) for n, t in _run(model, input_shape)}


def classification_loss(out: Any, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a classifier's output: one logits tensor, or, in training mode, the main
    logits first and auxiliary logits after them (torchvision's GoogLeNet and Inception3 return a
    namedtuple ``(logits, aux...)``), each auxiliary term weighted :data:`AUX_WEIGHT`."""
    if isinstance(out, torch.Tensor):
        return nn.functional.cross_entropy(out, y)
    flat = flatten_outputs(out)
    (name, main), aux = flat[0], flat[1:]
    loss = nn.functional.cross_entropy(main, y)
    for n, t in aux:
        if t.shape != main.shape:
            raise BadInput(f"the model returns {name} {tuple(main.shape)} and {n} {tuple(t.shape)}: latprune trains "
                           "classifiers whose extra outputs are auxiliary logits; train this model in your own loop "
                           "with latprune.LatencyPruner")
        loss = loss + AUX_WEIGHT * nn.functional.cross_entropy(t, y)
    return loss


def has_aux_outputs(model: nn.Module) -> bool:
    """Whether the model computes auxiliary classifiers in training mode only (torchvision's
    ``aux_logits`` convention: GoogLeNet, Inception3): its graph must be traced in training mode, or
    pruning would not see the layers that feed them."""
    return bool(getattr(model, "aux_logits", False))
