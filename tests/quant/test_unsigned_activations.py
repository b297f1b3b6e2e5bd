"""int8-static activations calibrated non-negative (after a ReLU) are quantized unsigned: [0, 255 * scale] as
int8 with zero point -128, twice the steps symmetric int8 gives them; every product route reads the zero point."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from onnx import TensorProto as TP, helper, numpy_helper as nh

import jaxinfer
from jaxinfer import arith, intmath
from jaxinfer.quant import calibrate as cal

def _conv_relu_conv() -> jaxinfer.Model:
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((8, 3, 3, 3)) / 5).astype(np.float32)
    w2 = (rng.standard_normal((6, 8, 3, 3)) / 8).astype(np.float32)
    wf = (rng.standard_normal((6 * 8 * 8, 5)) / 20).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Flatten", ["r2"], ["f"]), helper.make_node("MatMul", ["f", "wf"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TP.FLOAT, ["b", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TP.FLOAT, ["b", 5])],
                          [nh.from_array(w1, "w1"), nh.from_array(w2, "w2"), nh.from_array(wf, "wf")])
    return jaxinfer.load(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def _batches(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((4, 3, 8, 8)).astype(np.float32)} for _ in range(n)]


def test_quantize_static_unsigned_values():
    x = np.array([0.0, 0.5, 1.0, 127.5, 254.9, 255.0, 300.0], np.float32)
    q = arith.quantize_static(jnp.asarray(x), np.float32(1.0), unsigned=True)
    np.testing.assert_array_equal(np.asarray(q.qvalue), [-128, -128, -127, 0, 127, 127, 127])  # half to even
    assert int(np.asarray(q.zero_point).reshape(())) == arith.UNSIGNED_ZP
    np.testing.assert_array_equal(np.asarray(arith.dequantize_act(q, jnp.float32)), [0, 0, 1, 128, 255, 255, 255])


def test_relu_outputs_are_calibrated_unsigned_and_closer_to_float():
    m = _conv_relu_conv()
    cal_data, test = _batches(4, 1), _batches(3, 2)
    q = jaxinfer.quantize(m, "int8-static", calibration=cal_data)
    # the layout pass stores conv weights HWIO (w1__hwio); the image is signed, ReLU outputs are not
    assert not q.params["w1__hwio"].act_unsigned
    assert q.params["w2__hwio"].act_unsigned and q.params["wf"].act_unsigned  # after a ReLU
    # the scale of an unsigned value spans 255 steps: threshold / 255
    obs = cal.observe(m, ["r1"], cal_data)
    assert float(q.params["w2__hwio"].act_scale) == pytest.approx(obs["r1"].absmax / 255.0, rel=1e-6)
    ref = np.concatenate([m.run(b)["y"] for b in test])
    got = np.concatenate([q.run(b)["y"] for b in test])
    err = np.abs(got - ref).max()
    # the same weights with symmetric activations: the error the unsigned steps halve
    sym = q.with_params({k: (arith.W8A8(v.w, v.act_scale * 255.0 / 127.0, v.transposed) if isinstance(v, arith.W8A8)
                             and v.act_unsigned else v) for k, v in q.params.items()})
    err_sym = np.abs(np.concatenate([sym.run(b)["y"] for b in test]) - ref).max()
    assert err < 0.8 * err_sym, (err, err_sym)


@pytest.mark.parametrize("route", ["native", "float"])
def test_every_route_reads_the_zero_point(monkeypatch, route):
    """The int8 kernels (dot and conv) and the float route of accelerators give the dequantized product."""
    if route == "float":
        monkeypatch.setattr(intmath, "native_int8_dots", lambda: False)
    rng = np.random.default_rng(1)
    x = np.abs(rng.standard_normal((2, 8, 6, 6))).astype(np.float32)
    k = (rng.standard_normal((4, 8, 3, 3)) / 8).astype(np.float32)
    wq = cal.weight_int8(k, (0,))
    s = np.float32(x.max() / 255.0)
    w = arith.W8A8(wq, jnp.asarray(s), act_unsigned=True)
    xd = np.asarray(arith.dequantize_act(arith.quantize_static(jnp.asarray(x), s, True), jnp.float32))
    kd = np.asarray(wq.qvalue, np.float32) * np.asarray(wq.scale)
    dn = ("NCHW", "OIHW", "NCHW")
    got = jax.jit(lambda x: arith.conv(x, w, (1, 1), "SAME", dimension_numbers=dn))(x)
    want = jax.lax.conv_general_dilated(xd, kd, (1, 1), "SAME", dimension_numbers=dn, precision="highest")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    m = np.abs(rng.standard_normal((5, 32))).astype(np.float32)
    wm = (rng.standard_normal((32, 7)) / 6).astype(np.float32)
    mq = cal.weight_int8(wm.T, (0,))
    sm = np.float32(m.max() / 255.0)
    wt = arith.W8A8(mq, jnp.asarray(sm), transposed=True, act_unsigned=True)
    got = jax.jit(lambda a: arith.matmul(a, wt))(m)
    md = np.asarray(arith.dequantize_act(arith.quantize_static(jnp.asarray(m), sm, True), jnp.float32))
    want = md @ (np.asarray(mq.qvalue, np.float32) * np.asarray(mq.scale)).T
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_save_and_load_keep_unsigned_activations(tmp_path):
    q = jaxinfer.quantize(_conv_relu_conv(), "int8-static", calibration=_batches(2, 3))
    jaxinfer.save(q, tmp_path / "m")
    back = jaxinfer.load(tmp_path / "m")
    assert back.params["w2__hwio"].act_unsigned and not back.params["w1__hwio"].act_unsigned
    feeds = _batches(1, 4)[0]
    np.testing.assert_array_equal(back.run(feeds)["y"], q.run(feeds)["y"])


def test_mse_observer_searches_with_the_unsigned_steps():
    """For an unsigned value the mse search fake-quantizes with 255 steps: its threshold is the one that
    minimizes that error, never coarser than the symmetric search's."""
    rng = np.random.default_rng(5)
    values = np.abs(rng.standard_normal(50_000)).astype(np.float32)
    values[:3] = [9.0, 8.0, 7.5]
    obs = cal.Observer(rng)
    obs.update(values)
    t255, t127 = obs.threshold("mse", steps=255), obs.threshold("mse", steps=127)

    def err(t, steps):
        s = t / steps
        return float(np.mean((np.clip(np.rint(values / s), 0, steps) * s - values) ** 2))
    assert err(t255, 255) <= err(t127, 255) and t255 >= t127
    scales = cal.act_scales({"v": obs}, "mse", unsigned={"v"})
    assert scales["v"] == pytest.approx(t255 / 255.0)
