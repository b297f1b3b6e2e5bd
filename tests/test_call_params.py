"""How Model's executables take the params (jaxinfer/call_params.py): a tuple, the scalars packed by dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import jaxinfer
from jaxinfer.call_params import MIN_SCALARS, LaidOutCall, param_layout


def _params(scalars: int) -> dict:
    rng = np.random.default_rng(scalars)
    out = {"w": jnp.asarray(rng.standard_normal((3, 4)).astype(np.float32))}
    for i in range(scalars):
        out[f"s{i}"] = jnp.asarray(np.float32(i + 0.5)) if i % 3 else jnp.asarray(np.int8([i]))
    out["b"] = jnp.asarray(rng.standard_normal(4).astype(np.float32))
    return out


def test_scalars_packed_by_dtype_and_read_back():
    params = _params(7)
    layout = param_layout(params)
    assert layout.names == ("w", "b")
    assert {(d, i) for _, d, i, _ in layout.slots} == {("int8", 0), ("int8", 1), ("int8", 2), ("float32", 0),
                                                        ("float32", 1), ("float32", 2), ("float32", 3)}
    arrays, packed = layout.pack(params)
    assert len(arrays) == 2 and {d: v.shape for d, v in packed.items()} == {"int8": (3,), "float32": (4,)}
    back = jax.jit(layout.unpack)((arrays, packed))
    assert set(back) == set(params)
    for k, v in params.items():
        assert back[k].shape == v.shape and back[k].dtype == v.dtype
        np.testing.assert_array_equal(np.asarray(back[k]), np.asarray(v))


def test_few_or_spread_scalars_stay_arguments():
    assert param_layout(_params(MIN_SCALARS - 1)).slots == ()
    assert param_layout(_params(MIN_SCALARS)).slots != ()
    devices = jax.devices()
    if len(devices) > 1:  # scalars on two devices are not packed into one array
        spread = {k: jax.device_put(v, devices[i % 2]) for i, (k, v) in enumerate(_params(6).items())}
        assert param_layout(spread).slots == ()


def _divided_model() -> onnx.ModelProto:
    """y = x / a / b / c / d / e: Div's scalar divisors stay params (model.FOLDABLE_READERS)."""
    names = "abcde"
    nodes, prev = [], "x"
    for i, n in enumerate(names):
        out = "y" if i == len(names) - 1 else f"t{i}"
        nodes.append(helper.make_node("Div", [prev, n], [out]))
        prev = out
    inits = [numpy_helper.from_array(np.array(2.0 + i, np.float32), n) for i, n in enumerate(names)]
    graph = helper.make_graph(nodes, "div", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_model_runs_packed_and_takes_new_params_without_retracing():
    m = jaxinfer.load(_divided_model())
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    want = x / 2 / 3 / 4 / 5 / 6
    np.testing.assert_allclose(m.run({"x": x})["y"], want, rtol=1e-6)
    layout = m._call_params()[0]
    assert len(layout.slots) == 5 and layout.names == ()
    exe = m.compiled({"x": x})
    assert isinstance(exe, LaidOutCall) and "divide" in exe.as_text()
    traces = m.stats.traces
    halved = {k: v / 2 for k, v in m.params.items()}
    np.testing.assert_allclose(np.asarray(exe(halved, {"x": x})["y"]), want * 32, rtol=1e-6)  # the dict form
    m.params = halved  # a new dict: packed again, same executable
    np.testing.assert_allclose(m.run({"x": x})["y"], want * 32, rtol=1e-6)
    # another layout (d now of shape [1]): the executable's own layout packs them, on each call
    m.params = {k: v for k, v in list(halved.items())[:3]} | {"d": jnp.asarray([5.0], jnp.float32),
                                                              "e": jnp.asarray(12.0, jnp.float32)}
    np.testing.assert_allclose(m.run({"x": x})["y"], x / 1 / 1.5 / 2 / 5 / 12, rtol=1e-6)
    assert m.stats.traces == traces
