"""Run a TFLite model in LiteRT and in jaxinfer on the same inputs and compare."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxinfer.converters.tflite import load_tflite


#: LiteRT kernel sets: "auto" (XNNPACK delegate + builtins, LiteRT's default), "builtin" (optimized
#: builtin kernels, no delegate), "reference" (reference kernels).
KERNELS = ("auto", "builtin", "reference")


def litert_interpreter(data: bytes, kernels: str = "auto"):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    kind = {"auto": OpResolverType.AUTO, "builtin": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
            "reference": OpResolverType.BUILTIN_REF}[kernels]
    it = Interpreter(model_content=data, experimental_op_resolver_type=kind)
    it.allocate_tensors()
    return it


def litert_steps(data: bytes, steps: Sequence[dict[str, np.ndarray]], kernels: str = "auto") -> list[dict[str, np.ndarray]]:
    """LiteRT outputs (by tensor name) for consecutive calls on one interpreter (state carried)."""
    it = litert_interpreter(data, kernels)
    by_name = {d["name"]: d for d in it.get_input_details()}
    results = []
    for feeds in steps:
        for name, value in feeds.items():
            d = by_name[name]
            if tuple(d["shape"]) != value.shape:
                it.resize_tensor_input(d["index"], value.shape)
                it.allocate_tensors()
            it.set_tensor(d["index"], value)
        it.invoke()
        results.append({d["name"]: it.get_tensor(d["index"]).copy() for d in it.get_output_details()})
    return results


def quant_stats(ours: np.ndarray, ref: np.ndarray) -> tuple[float, int]:
    """(fraction of bit-exact elements, max |difference| in LSB)."""
    diff = np.abs(ours.astype(np.int64) - ref.astype(np.int64))
    return float((diff == 0).mean()) if diff.size else 1.0, int(diff.max()) if diff.size else 0


def compare(data: bytes, steps: Sequence[dict[str, np.ndarray]] | dict[str, np.ndarray], *, rtol: float = 1e-4,
            atol: float = 1e-5, kernels: str = "auto", min_exact: float = 0.999,
            **load_kwargs) -> list[tuple[float, int]]:
    """Assert jaxinfer matches LiteRT on every output of every step; return quantized (exact%, max LSB) stats."""
    if isinstance(steps, dict):
        steps = [steps]
    model = load_tflite(data, **load_kwargs)
    refs = litert_steps(data, steps, kernels)
    stats = []
    for i, (feeds, ref) in enumerate(zip(steps, refs)):
        ours = model.run(feeds)
        assert len(ours) == len(ref), (list(ours), list(ref))
        for (name, got), want in zip(ours.items(), ref.values()):
            got = np.asarray(got)
            assert got.shape == want.shape, f"step {i} output {name}: shape {got.shape} vs LiteRT {want.shape}"
            assert got.dtype == want.dtype, f"step {i} output {name}: dtype {got.dtype} vs LiteRT {want.dtype}"
            if want.dtype.kind in "iu" and want.dtype.itemsize <= 2:
                exact, lsb = quant_stats(got, want)
                stats.append((exact, lsb))
                assert lsb <= 1 and exact >= min_exact, f"step {i} output {name}: {exact:.4%} exact, max {lsb} LSB"
            elif want.dtype.kind in "fc":
                np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=f"step {i} output {name}")
            else:
                np.testing.assert_array_equal(got, want, err_msg=f"step {i} output {name}")
    return stats
