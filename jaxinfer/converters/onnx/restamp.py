"""Re-stamp the batch dimension of an ONNX model exported with a fixed batch.

Many exported CNNs declare ``[1, 3, 224, 224]`` and reshape with constants such
as ``[1, 9216]``. :func:`restamp_batch` rewrites the proto so the leading dim of
every graph input/output is ``batch`` (an int, or a name for a symbolic dim),
and every ``Reshape`` whose data flows from the inputs and whose constant shape
starts with the old batch size copies dim 0 from its input instead (``0``).
The result runs unchanged in onnxruntime and in jaxinfer, so both can be timed
at batch 8 on the same graph.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import ModelProto, numpy_helper

from ...errors import ModelLoadError
from ...graph import values_flowing_from


def _set_leading_dim(vi: onnx.ValueInfoProto, batch: int | str) -> None:
    dims = vi.type.tensor_type.shape.dim
    if not dims:
        return
    dims[0].Clear()
    if isinstance(batch, str):
        dims[0].dim_param = batch
    else:
        dims[0].dim_value = batch


def _batched_values(graph: onnx.GraphProto) -> set[str]:
    inits = {i.name for i in graph.initializer}
    inputs = {i.name for i in graph.input if i.name not in inits}
    return values_flowing_from(inputs, [(n.op_type, tuple(n.input), tuple(n.output)) for n in graph.node])


def restamp_batch(model: ModelProto, batch: int | str) -> ModelProto:
    """A copy of ``model`` whose leading (batch) dim is ``batch``; see the module doc."""
    out = ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {i.name: i for i in g.initializer}
    real_inputs = [i for i in g.input if i.name not in inits]
    if not real_inputs:
        raise ModelLoadError("model has no inputs to re-stamp")
    old = {i.type.tensor_type.shape.dim[0].dim_value for i in real_inputs if i.type.tensor_type.shape.dim}
    old.discard(0)
    old_batch = old.pop() if len(old) == 1 else None
    for vi in real_inputs:
        _set_leading_dim(vi, batch)
    for vi in g.output:
        _set_leading_dim(vi, batch)
    del g.value_info[:]
    if old_batch is None:
        return out
    batched = _batched_values(g)
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant" and n.output}
    for node in g.node:
        if node.op_type != "Reshape" or node.input[0] not in batched or len(node.input) < 2:
            continue
        name = node.input[1]
        if name in inits:
            shape = numpy_helper.to_array(inits[name])
        elif name in consts:
            shape = numpy_helper.to_array(consts[name].attribute[0].t)
        else:
            continue
        if shape.size and int(shape[0]) == old_batch:
            fixed = np.array(shape, dtype=np.int64)
            fixed[0] = 0  # copy dim 0 from the data input
            new_name = f"{name}__batch"
            if new_name not in inits:
                t = numpy_helper.from_array(fixed, new_name)
                g.initializer.append(t)
                inits[new_name] = t
            node.input[1] = new_name
    return out
