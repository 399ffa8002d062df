"""Reduced-precision ONNX without extra dependencies: an fp16 graph rewrite and int8 Q/DQ via onnxruntime.

FP16: every float32 initializer, constant and computation becomes float16, except
* the graph's inputs and outputs, which stay float32 (Cast nodes are inserted), so runtimes feed and read the same
  arrays as for fp32;
* shape arithmetic: Resize's `roi`/`scales`/`sizes` inputs and everything computing them (the spec requires
  float `scales`, and a size computed in fp16 could round to another pixel count);
* Softmax and Exp (a written-out softmax), kept in float32 so probabilities sum to one accurately (fp16 Exp
  overflows above 11.1), and everything computed from their outputs (the in-graph accumulation and division of a
  stitched model), so averaged probabilities keep float32 precision.
TensorRT builds such a graph as-is in strongly typed mode (no BuilderFlag.FP16, which TensorRT 11 removed);
ONNX Runtime's CPU provider runs it too, inserting its own casts around ops that lack fp16 kernels.

INT8: explicit quantisation (QuantizeLinear/DequantizeLinear pairs), per-channel symmetric weights, symmetric
activations (zero point 0, what TensorRT requires), float biases, Conv inputs only (TensorRT fuses each Q/DQ pair
into the int8 convolution; quantising residual adds would gain a little speed for some accuracy).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from imas_core.errors import ExportError
from imas_export.graph import set_min_ir_version
from imas_export.samples import Samples

_log = logging.getLogger(__name__)

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
FP32_INPUTS = {"Resize": (1, 2)}  # input positions that must stay float32 (roi, scales)
SHAPE_ONLY_OPS = {"Shape", "Size"}  # read only the shape of their input: never cast it
FP32_OPS = {"Softmax", "Exp"}  # computed in float32 on purpose (fp16 Exp overflows above 11.1)
INTEGER_TYPES = {TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64, TensorProto.UINT8}
FP16_MAX = 65504.0


def _float_types(model: onnx.ModelProto) -> dict[str, int]:
    graph = model.graph
    elem = {vi.name: vi.type.tensor_type.elem_type for vi in [*graph.input, *graph.output, *graph.value_info]}
    elem.update({init.name: init.data_type for init in graph.initializer})
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ExportError(f"fp16 conversion does not handle subgraphs (node {node.name!r}, {node.op_type})")
        if node.op_type == "Constant":
            elem[node.output[0]] = node.attribute[0].t.data_type
        for out in node.output:
            if out and not elem.get(out):
                raise ExportError(f"fp16 conversion: shape inference left the type of {out!r} unknown")
    return elem


def _downstream(graph: onnx.GraphProto, start: set[int]) -> set[int]:
    """`start` and every node that consumes, directly or not, an output of a node in `start`."""
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    seen, stack = set(start), list(start)
    while stack:
        for out in graph.node[stack.pop()].output:
            for j in consumers.get(out, []):
                if j not in seen:
                    seen.add(j)
                    stack.append(j)
    return seen


def _fp32_cone(graph: onnx.GraphProto, elem: dict[str, int]) -> set[int]:
    """Indices of nodes that must compute in float32: Softmax and all after it, and float producers of shape math.

    Shape arithmetic is whatever feeds Resize roi/scales/sizes or a float -> integer Cast; the walk goes back
    through integer nodes too and stops at Shape/Size, whose data input is the feature map itself.
    """
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    keep = _downstream(graph, {i for i, node in enumerate(graph.node) if node.op_type in FP32_OPS})
    stack = [n.input[k] for n in graph.node if n.op_type == "Resize" for k in (1, 2, 3) if k < len(n.input)]
    for node in graph.node:
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if node.op_type == "Cast" and elem.get(node.input[0]) == FLOAT and to in INTEGER_TYPES:
            stack.append(node.input[0])
    seen: set[int] = set()
    while stack:
        i = producer.get(stack.pop())
        if i is None or i in seen or graph.node[i].op_type in SHAPE_ONLY_OPS:
            continue
        seen.add(i)
        if any(elem.get(o) == FLOAT for o in graph.node[i].output):
            keep.add(i)
        stack.extend(t for t in graph.node[i].input if t)
    return keep


def convert_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of a float32 model that computes in float16 with float32 inputs and outputs (see module doc)."""
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    graph = model.graph
    elem = _float_types(model)
    keep = _fp32_cone(graph, elem)

    def required(i: int, node: onnx.NodeProto, pos: int) -> int | None:
        if node.op_type in SHAPE_ONLY_OPS:
            return None
        if i in keep or pos in FP32_INPUTS.get(node.op_type, ()):
            return FLOAT
        return FLOAT16

    # New element type of every float32 tensor: produced by an fp16 node -> fp16; constants follow their consumers.
    new: dict[str, int] = {vi.name: FLOAT for vi in graph.input}
    wants: dict[str, set[int]] = {}
    for i, node in enumerate(graph.node):
        for pos, name in enumerate(node.input):
            if name and elem.get(name) == FLOAT and (req := required(i, node, pos)) is not None:
                wants.setdefault(name, set()).add(req)
        for out in node.output:
            if elem.get(out) == FLOAT and node.op_type != "Constant":
                new[out] = FLOAT if i in keep else FLOAT16
    constants = {init.name for init in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}
    for name in constants:
        if elem.get(name) == FLOAT:
            new[name] = FLOAT16 if wants.get(name) == {FLOAT16} else FLOAT

    def to_half(tensor: onnx.TensorProto) -> onnx.TensorProto:
        arr = numpy_helper.to_array(tensor)
        if arr.size and np.abs(arr).max() > FP16_MAX:
            raise ExportError(f"constant {tensor.name!r} exceeds the float16 range ({np.abs(arr).max():.3g})")
        return numpy_helper.from_array(arr.astype(np.float16), tensor.name)

    for k, init in enumerate(graph.initializer):
        if new.get(init.name) == FLOAT16:
            graph.initializer[k].CopyFrom(to_half(init))

    # Graph outputs computed in fp16 get a final Cast back to float32 under their public name.
    renamed = {o.name: o.name + "_fp16" for o in graph.output if new.get(o.name) == FLOAT16}
    nodes: list[onnx.NodeProto] = []
    casts: dict[tuple[str, int], str] = {}
    for i, node in enumerate(graph.node):
        if i not in keep:
            _retype_node(node, new)
        for pos, name in enumerate(node.input):
            req = required(i, node, pos) if elem.get(name) == FLOAT else None
            source = renamed.get(name, name)
            if req is None or new.get(name, FLOAT) == req:
                node.input[pos] = source
                continue
            if (name, req) not in casts:
                casts[name, req] = f"{name}__{'fp16' if req == FLOAT16 else 'fp32'}"
                nodes.append(helper.make_node("Cast", [source], [casts[name, req]], to=req, name=casts[name, req]))
            node.input[pos] = casts[name, req]
        node.output[:] = [renamed.get(t, t) for t in node.output]
        nodes.append(node)
    for public, internal in renamed.items():
        nodes.append(helper.make_node("Cast", [internal], [public], to=FLOAT, name=f"{public}_to_fp32"))
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    set_min_ir_version(model)
    onnx.checker.check_model(model)
    return model


def _retype_node(node: onnx.NodeProto, new: dict[str, int]) -> None:
    """Make ops whose output type comes from an attribute (Cast, Constant, ConstantOfShape) produce fp16."""
    if not node.output or new.get(node.output[0]) != FLOAT16:
        return
    for attr in node.attribute:
        if node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT:
            attr.i = FLOAT16
        elif node.op_type in ("Constant", "ConstantOfShape") and attr.name == "value" and attr.t.data_type == FLOAT:
            arr = numpy_helper.to_array(attr.t).astype(np.float16)
            attr.t.CopyFrom(numpy_helper.from_array(arr, attr.t.name))
        elif attr.name == "dtype" and attr.i == FLOAT:
            raise ExportError(f"fp16 conversion does not handle {node.op_type} with a float32 dtype attribute")


def quantize_int8(source: Path, target: Path, calibration: Samples, input_dtype: str, work_dir: Path) -> None:
    """Write an explicitly quantised (Q/DQ) int8 copy of the float32 model `source`, calibrated on `calibration`.

    Runs onnxruntime's quantisation pre-processing (shape inference + basic optimisation) first when it succeeds.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = work_dir / "preprocessed.onnx"
    try:
        quant_pre_process(str(source), str(prepared))
    except Exception as err:  # the pre-processing is an optimisation; quantising without it is still correct
        _log.warning("ONNX Runtime quantisation pre-processing failed (%s); quantising the model as exported", err)
        prepared = source
    input_name = onnx.load(str(source), load_external_data=False).graph.input[0].name
    dtype = np.uint8 if input_dtype == "uint8" else np.float32

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.index = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.index >= len(calibration):
                return None
            self.index += 1
            return {input_name: calibration.images[self.index - 1 : self.index].astype(dtype)}

    quantize_static(
        str(prepared),
        str(target),
        Reader(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["Conv"],
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        # MinMax calibration keeps only per-image ReduceMin/ReduceMax results, so memory stays small; do not set
        # CalibMaxIntermediateOutputs: onnxruntime 1.31 discards (not merges) the outputs collected up to that count.
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False},
    )
    model = onnx.load(str(target))
    set_min_ir_version(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(target))
