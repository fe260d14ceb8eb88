"""The layer micro-models the profiler times: one conv (+ folded BN + activation) or linear layer,
as each runtime runs it deployed."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from latprune.latency_tables.table import LayerSignature

__all__ = ["layer_input_shape", "layer_module", "layer_onnx"]


def layer_input_shape(sig: LayerSignature, batch: int, c_in: int) -> tuple[int, ...]:
    return (batch, c_in) if sig.kind == "linear" else (batch, c_in, *sig.in_hw)


def layer_module(sig: LayerSignature, c_in: int, c_out: int):
    """The layer as PyTorch runs it deployed: conv + BN + activation, or a linear layer."""
    if sig.kind == "linear":
        return nn.Linear(c_in, c_out)
    groups = c_out if sig.kind == "dwconv" else 1
    layers = [
        nn.Conv2d(c_in, c_out, sig.kernel, sig.stride, sig.padding, sig.dilation, groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    if sig.activation == "relu":
        layers.append(nn.ReLU(inplace=True))
    elif sig.activation == "relu6":
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


def layer_onnx(sig: LayerSignature, c_in: int, c_out: int, batch: int):
    """The layer as ONNX Runtime runs it deployed: Conv with BN folded into its bias, + activation.

    Built with ``onnx.helper`` (about a millisecond) rather than through an exporter.
    """
    rng = np.random.default_rng(0)
    x_shape = list(layer_input_shape(sig, batch, c_in))
    nodes, inits = [], []
    if sig.kind == "linear":
        w = rng.standard_normal((c_out, c_in), dtype=np.float32) * 0.1
        inits += [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.zeros(c_out, np.float32), "B")]
        nodes.append(helper.make_node("Gemm", ["X", "W", "B"], ["Y"], transB=1))
        y_rank = 2
    else:
        groups = c_out if sig.kind == "dwconv" else 1
        w = rng.standard_normal((c_out, c_in // groups, *sig.kernel), dtype=np.float32) * 0.1
        inits += [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.zeros(c_out, np.float32), "B")]
        act = sig.activation in ("relu", "relu6")
        nodes.append(
            helper.make_node(
                "Conv", ["X", "W", "B"], ["C" if act else "Y"], kernel_shape=list(sig.kernel),
                strides=list(sig.stride), pads=[*sig.padding, *sig.padding],
                dilations=list(sig.dilation), group=groups,
            )
        )
        if sig.activation == "relu":
            nodes.append(helper.make_node("Relu", ["C"], ["Y"]))
        elif sig.activation == "relu6":
            nodes.append(helper.make_node("Clip", ["C", "lo", "hi"], ["Y"]))
            inits += [numpy_helper.from_array(np.float32(0), "lo"), numpy_helper.from_array(np.float32(6), "hi")]
        y_rank = 4
    graph = helper.make_graph(
        nodes, "layer",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None] * y_rank)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
