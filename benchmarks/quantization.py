"""Quantization on CPU: accuracy and speed of f32 / bf16 / int8-weight / int8-dynamic / int8-static.

Three parts (``--parts``), each printing a table and merging its rows into one JSON file, then
one PNG plot of accuracy against speed (``--plot``):

* ``encoder``: the 4-layer d_model 1024 / ffn 4096 encoder (~50M params, built in code by
  jaxinfer.quant.fixtures.encoder). Per batch x tokens shape every variant runs on the same
  input in one process, in rotating blocks of back-to-back calls (``--timing interleaved``: call by
  call; see ``jaxinfer.bench.blocked`` for why blocks); each figure is the median of --runs calls.
  onnxruntime runs the same model in f32 and after ``quantize_dynamic``; ``ortq-jaxinfer`` is
  jaxinfer running onnxruntime's quantized file (MatMulInteger as int8 dots). Cosine is against
  our f32 output; the crossover is the smallest tokens count where int8-dynamic stops
  beating f32.
* ``cnn``: the onnx wheel's light CNNs (resnet50, squeezenet, ...). Their stored weights are
  constants (ConstantOfShape), so their logits tie and top-1 means nothing: each CNN gets
  seeded He-normal weights and a classifier head fitted as a nearest-class-mean probe on
  10 synthetic image families (gratings + palettes + blobs + smooth noise, ImageNet-
  normalized; no ImageNet here). int8-static is calibrated on 32 such images; top-1
  agreement with f32 and logit cosine are measured on --cnn-images other images.
* ``matmul``: why our f32 trails onnxruntime's at few tokens: one skinny matmul
  (8 x 1024 x 4096 by default) in XLA (default and with flags), numpy (also called from inside
  jit through ``jax.pure_callback``), and onnxruntime's
  MatMul alone, with 1 and all intra-op threads; median and min of --runs calls (on a shared
  machine the min is the better estimate of the uncontended speed).

    python benchmarks/quantization.py --parts encoder --shapes 1x8,4x32 --runs 20
    python benchmarks/quantization.py --parts cnn --cnn squeezenet,resnet50 --cnn-images 128
    python benchmarks/quantization.py --parts matmul
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import jaxinfer
from jaxinfer.bench import blocked, interleaved
from jaxinfer.quant import fixtures, quantize
from jaxinfer.quant.report import cosine


def _ort_sessions(proto, want: set[str], tune: bool = False) -> dict:
    """onnxruntime sessions for ``ort-f32`` / ``ort-int8``; ``ortq-jaxinfer`` is jaxinfer loading the very
    file onnxruntime's ``quantize_dynamic`` wrote (DynamicQuantizeLinear + MatMulInteger)."""
    import onnx
    import onnxruntime as ort

    sessions: dict[str, Any] = {}
    tmp = Path(tempfile.mkdtemp())
    f32 = tmp / "encoder.onnx"
    onnx.save(proto, str(f32))
    so = ort.SessionOptions()
    if "ort-f32" in want:
        sessions["ort-f32"] = ort.InferenceSession(str(f32), so, providers=["CPUExecutionProvider"])
    if want & {"ort-int8", "ortq-jaxinfer"}:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        q = tmp / "encoder.int8.onnx"
        quantize_dynamic(str(f32), str(q), weight_type=QuantType.QInt8)
        if "ort-int8" in want:
            sessions["ort-int8"] = ort.InferenceSession(str(q), so, providers=["CPUExecutionProvider"])
        if "ortq-jaxinfer" in want:
            sessions["ortq-jaxinfer"] = jaxinfer.load(str(q), tune=tune)
    return sessions


def encoder_part(args: argparse.Namespace) -> dict[str, Any]:
    variants = args.variants.split(",")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    proto = fixtures.encoder(args.d_model, args.ffn, args.layers)
    base = jaxinfer.load(proto.SerializeToString(), tune=args.tune)
    calib = [fixtures.inputs(1, 16, args.d_model, seed=100 + i) for i in range(4)]
    models = {"f32": base}
    for v in variants:
        if v not in models and not v.startswith("ort"):
            models[v] = quantize(base, v, calibration=calib if v == "int8-static" else None)
    sessions = _ort_sessions(proto, {v for v in variants if v.startswith("ort")}, args.tune)
    models.update({k: v for k, v in sessions.items() if not k.startswith("ort-")})
    bytes_ = {v: m.report().totals["params_bytes"] if hasattr(m, "report") else m.info()["params_bytes"]
              for v, m in models.items()}
    rows = []
    for b, t in shapes:
        feeds = fixtures.inputs(b, t, args.d_model, seed=7)
        ref = base.run(feeds)["y"]
        calls = {}
        for v in variants:
            if v in models:
                m = models[v]
                m.warmup(feeds)
                calls[v] = (lambda m=m: m.run(feeds)["y"])
            else:
                s = sessions[v]
                calls[v] = (lambda s=s: s.run(["y"], feeds)[0])
        outs = {v: f() for v, f in calls.items()}
        timer = blocked if args.timing == "blocks" else interleaved
        ms_each = dict(zip(calls, timer(list(calls.values()), args.runs)))
        for v in calls:
            ms = ms_each[v]
            rows.append({"batch": b, "tokens": t, "variant": v, "ms": round(ms, 3),
                         "cosine_vs_f32": round(cosine(outs[v], ref), 6), "params_bytes": bytes_.get(v)})
        f32ms = next(r["ms"] for r in rows if r["batch"] == b and r["tokens"] == t and r["variant"] == "f32")
        line = "  ".join(f"{r['variant']} {r['ms']:.2f}ms ({f32ms / r['ms']:.2f}x)" for r in rows
                         if r["batch"] == b and r["tokens"] == t)
        print(f"{b}x{t}: {line}", flush=True)
    cross = None
    if "int8-dynamic" in variants:
        for b, t in shapes:
            f = next(r["ms"] for r in rows if (r["batch"], r["tokens"], r["variant"]) == (b, t, "f32"))
            q = next(r["ms"] for r in rows if (r["batch"], r["tokens"], r["variant"]) == (b, t, "int8-dynamic"))
            if q >= f and cross is None:
                cross = b * t
    print(f"crossover (batch x tokens where int8-dynamic stops beating f32): {cross}")
    return {"model": {"d_model": args.d_model, "ffn": args.ffn, "layers": args.layers}, "runs": args.runs,
            "rows": rows, "crossover_tokens": cross}


# ------------------------------------------------------------------------ light CNNs
# The onnx wheel's light CNNs carry constant weights (ConstantOfShape), so their logits tie and
# top-1 is meaningless. Each CNN is given seeded He-normal weights instead, and a classifier head
# fitted like a nearest-class-mean probe on K synthetic image families (so top-1 has the margins
# of a trained classifier, not the near-ties of a random one). No ImageNet: inputs are generated.
FAMILIES = 10


def family_images(n: int, seed: int, hw: int = 224) -> tuple[np.ndarray, np.ndarray]:
    """``n`` structured images (ImageNet-normalized NCHW float32) and their family labels.

    A family fixes a palette, a grating orientation/frequency and a blob count; each image
    jitters them and adds smooth low-frequency colour noise and random blob positions.
    """
    from scipy.ndimage import gaussian_filter

    fam_rng = np.random.default_rng(12345)
    fams = [{"palette": fam_rng.random((3, 3)), "theta": fam_rng.uniform(0, np.pi), "freq": fam_rng.uniform(3, 18),
             "blobs": int(fam_rng.integers(0, 4))} for _ in range(FAMILIES)]
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:hw, 0:hw] / hw
    mean = np.array([0.485, 0.456, 0.406])[:, None, None]
    std = np.array([0.229, 0.224, 0.225])[:, None, None]
    labels = rng.integers(0, FAMILIES, n)
    out = np.empty((n, 3, hw, hw), np.float32)
    for i, k in enumerate(labels):
        f = fams[k]
        noise = gaussian_filter(np.kron(rng.random((3, 8, 8)), np.ones((hw // 8, hw // 8))), (0, 12, 12))
        th = f["theta"] + rng.normal(0, 0.15)
        fr = f["freq"] * rng.uniform(0.85, 1.15)
        g = 0.5 + 0.5 * np.sin(2 * np.pi * fr * (np.cos(th) * xx + np.sin(th) * yy) + rng.uniform(0, 2 * np.pi))
        img = f["palette"][0][:, None, None] * g + f["palette"][1][:, None, None] * (1 - g)
        img = 0.7 * img + 0.3 * noise
        for _ in range(f["blobs"]):
            cy, cx, s = rng.random(), rng.random(), rng.uniform(0.05, 0.15)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
            img = img * (1 - blob) + blob * f["palette"][2][:, None, None]
        out[i] = ((img - mean) / std).astype(np.float32)
    return out, labels


def he_weights(model, seed: int):
    """``model`` with every conv/Gemm/MatMul weight redrawn He-normal (own copy per node) and zero biases."""
    from jaxinfer.graph import Node
    from jaxinfer.model import Model
    from jaxinfer.passes.cleanup import eliminate_dead_nodes

    rng = np.random.default_rng(seed)
    g = model.graph
    inits = dict(g.initializers)
    inits.update({k: np.asarray(v) for k, v in model.params.items()})
    nodes = []
    for idx, n in enumerate(g.nodes):
        w = inits.get(n.inputs[1]) if len(n.inputs) > 1 else None
        if n.op_type in ("Conv", "Gemm", "MatMul") and w is not None and w.dtype.kind == "f" and w.ndim >= 2:
            if n.op_type == "Conv":
                fan_in = int(np.prod(w.shape[:-1])) if n.domain == "jaxinfer" else int(np.prod(w.shape[1:]))
            else:
                fan_in = w.shape[1] if n.attrs.get("transB", 0) else w.shape[0]
            ins = list(n.inputs)
            ins[1] = f"he{idx}.w"
            inits[ins[1]] = (rng.standard_normal(w.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
            if len(ins) > 2 and ins[2]:
                ins[2] = f"he{idx}.b"
                inits[ins[2]] = np.zeros_like(np.asarray(g.initializers.get(n.inputs[2], model.params.get(n.inputs[2]))))
            n = Node(n.op_type, tuple(ins), n.outputs, n.attrs, n.name, n.domain)
        nodes.append(n)
    graph = eliminate_dead_nodes(g.replace(nodes=tuple(nodes), initializers=inits))
    return Model(graph, model.registry, source=model.source)


def fit_head(model, images: np.ndarray, labels: np.ndarray, batch: int):
    """Set the last product's weights to a nearest-class-mean probe over the image families.

    Rows 0..K-1 are the centred, normalized mean features of each family (scaled so logits have
    unit spread); the other classes get a bias far below, so top-1 is one of the K families.
    """
    from jaxinfer.quant.calibrate import probe

    g = model.graph
    last = next(n for n in reversed(g.nodes) if n.op_type in ("Conv", "Gemm"))
    feats = []
    pr = probe(model, [last.inputs[0]])
    for i in range(0, len(images), batch):
        x = pr.run({model.inputs[0].name: images[i:i + batch]})[last.inputs[0]]
        feats.append(x.reshape(x.shape[0], x.shape[1], -1).mean(-1))  # spatial mean (a 1x1 conv head + GAP)
    f = np.concatenate(feats).astype(np.float64)
    mu = f.mean(0)
    protos = np.stack([f[labels == k].mean(0) - mu for k in range(FAMILIES)])
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    spread = np.std((f - mu) @ protos.T)
    w = np.asarray(model.params[last.inputs[1]])
    n_out = w.shape[-1] if last.op_type == "Conv" else (w.shape[0] if last.attrs.get("transB", 0) else w.shape[1])
    head = np.zeros((n_out, f.shape[1]))
    head[:FAMILIES] = protos / spread
    bias = np.full(n_out, -10.0)
    bias[:FAMILIES] = -(mu @ head[:FAMILIES].T)
    if last.op_type == "Conv":
        new_w = head.T.reshape(w.shape)  # 1x1 HWIO
    else:
        new_w = head if last.attrs.get("transB", 0) else head.T
    params = dict(model.params)
    params[last.inputs[1]] = new_w.astype(np.float32)
    params[last.inputs[2]] = bias.astype(np.float32)
    return model.with_params(params), last.label


def logits_name(model) -> str:
    """The value feeding the final Softmax (the logits), else the first output."""
    out = model.outputs[0].name
    prod = {o: n for n in model.graph.nodes for o in n.outputs}
    n = prod.get(out)
    return n.inputs[0] if n is not None and n.op_type == "Softmax" else out

CNN_VARIANTS = "f32,bf16,int8-weight,int8-dynamic,int8-static,int8-static-percentile"


def _cnn_variant(model, v: str, cal: list[dict[str, np.ndarray]]):
    """``f32``, a quantize method, ``int8-static-<observer>``; a ``+ends`` suffix keeps the
    first and last conv/Gemm in float (the usual first remedy for an accuracy miss)."""
    if v == "f32":
        return model
    v, _, ends = v.partition("+")
    products = [n.name for n in model.graph.nodes if n.op_type in ("Conv", "Gemm")]
    exclude = [products[0], products[-1]] if ends == "ends" else []
    if v.startswith("int8-static"):
        observer = v.removeprefix("int8-static").lstrip("-") or "minmax"
        return quantize(model, "int8-static", calibration=cal, observer=observer, exclude=exclude, measure=False)
    return quantize(model, v, exclude=exclude, measure=False)


def cnn_part(args: argparse.Namespace) -> dict[str, Any]:
    """Top-1 agreement / logit cosine / latency of each variant on each light CNN (see module doc)."""
    import onnx

    from jaxinfer.bench import light_models
    from jaxinfer.converters.onnx.restamp import restamp_batch
    from jaxinfer.quant.calibrate import probe

    b = args.cnn_batch
    xt, yt = family_images(64, seed=1)
    xe, ye = family_images(args.cnn_images, seed=2)
    rows = []
    for name in args.cnn.split(","):
        path = next(p for p in light_models() if name in p.name)
        model = he_weights(jaxinfer.load(restamp_batch(onnx.load(path), b)), seed=0)
        inp = model.inputs[0].name
        model, head = fit_head(model, xt, yt, b)
        cal = [{inp: xt[i:i + b]} for i in range(0, 32, b)]
        ev = [{inp: xe[i:i + b]} for i in range(0, len(xe), b)]
        ln = logits_name(model)
        ref = None
        timing_feed = ev[0]
        for v in args.cnn_variants.split(","):
            t0 = time.perf_counter()
            q = _cnn_variant(model, v, cal)
            pr = probe(q, [ln])
            lg = np.concatenate([np.asarray(pr.run(f)[ln], np.float32).reshape(b, -1) for f in ev])
            if ref is None:
                ref = lg
            q.warmup(timing_feed)
            times = []
            for _ in range(args.cnn_runs):
                t1 = time.perf_counter()
                q.run(timing_feed)
                times.append(time.perf_counter() - t1)
            srt = np.sort(ref, 1)
            row = {"model": name, "variant": v, "batch": b, "images": len(xe),
                   "top1_agreement": float((lg.argmax(1) == ref.argmax(1)).mean()),
                   # over the fitted family classes: the other ~990 logits are one constant that dilutes a cosine
                   "family_logit_cosine": round(cosine(lg[:, :FAMILIES], ref[:, :FAMILIES]), 6),
                   "logit_cosine_all": round(cosine(lg, ref), 6), "family_accuracy": float((lg.argmax(1) == ye).mean()),
                   "ms": round(float(np.median(times)) * 1e3, 2),
                   "params_bytes": sum(int(np.dtype(x.dtype).itemsize * np.prod(x.shape))
                                       for x in __import__("jax").tree_util.tree_leaves(q.params)),
                   "f32_median_margin": round(float(np.median(srt[:, -1] - srt[:, -2])), 4),
                   "head": head, "seconds": round(time.perf_counter() - t0, 1)}
            if row["top1_agreement"] < 1.0:
                flipped = np.nonzero(lg.argmax(1) != ref.argmax(1))[0]
                row["flipped_f32_margins"] = [round(float(srt[i, -1] - srt[i, -2]), 4) for i in flipped]
            rows.append(row)
            print(f"{name:10s} {v:24s} top1 {row['top1_agreement']:.4f}  logit cos {row['family_logit_cosine']:.6f}  "
                  f"family acc {row['family_accuracy']:.3f}  {row['ms']:9.1f} ms/batch{b}  "
                  f"{row['params_bytes']:>11,d} B", flush=True)
    return {"batch": b, "images": len(xe), "calibration_images": 32, "rows": rows}


# -------------------------------------------------------------------- skinny matmul
MATMUL_SCRIPT = r"""
import json, sys, time, numpy as np
m, k, n, runs = (int(v) for v in sys.argv[1:5])
rng = np.random.default_rng(0)
x = rng.standard_normal((m, k)).astype(np.float32)
w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
def med(f):
    f(); f()
    ts = []
    for _ in range(runs):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return [round(float(np.median(ts)) * 1e3, 3), round(float(np.min(ts)) * 1e3, 3)]
out = {}
import jax, jax.numpy as jnp
from jax import lax
xd, wd = jax.device_put(x), jax.device_put(w)
for prec in ("highest", "default"):
    p = lax.Precision.HIGHEST if prec == "highest" else lax.Precision.DEFAULT
    f = jax.jit(lambda a, b: jnp.matmul(a, b, precision=p))
    out[f"xla_{prec}"] = med(lambda: f(xd, wd).block_until_ready())
out["numpy"] = med(lambda: x @ w)
# the same product inside a jitted function, handed to numpy's BLAS by a host callback
cb = jax.jit(lambda a, b: jax.pure_callback(lambda u, v: np.matmul(u, v), jax.ShapeDtypeStruct((m, n), jnp.float32), a, b))
out["xla_callback_numpy"] = med(lambda: cb(xd, wd).block_until_ready())
import onnx, onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], [numpy_helper.from_array(w, "w")])
proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
for threads in (1, 0):
    so = ort.SessionOptions(); so.intra_op_num_threads = threads
    s = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    out[f"ort_threads{threads or 'all'}"] = med(lambda: s.run(None, {"x": x}))
print(json.dumps(out))
"""

MATMUL_ENVS = {
    "default": {},
    "--xla_cpu_multi_thread_eigen=false, OMP/OPENBLAS 1 thread": {
        "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"},
    "--xla_cpu_use_xnnpack=true": {"XLA_FLAGS": "--xla_cpu_use_xnnpack=true"},
    "--xla_cpu_use_thunk_runtime=false": {"XLA_FLAGS": "--xla_cpu_use_thunk_runtime=false"},
}


def matmul_part(args: argparse.Namespace) -> dict[str, Any]:
    """One skinny matmul timed in fresh processes (flags apply at backend start)."""
    rows = []
    for m in (int(v) for v in args.matmul_rows.split(",")):
        for label, env in MATMUL_ENVS.items():
            proc = subprocess.run([sys.executable, "-c", MATMUL_SCRIPT, str(m), str(args.matmul_k), str(args.matmul_n),
                                   str(args.runs)], env={**os.environ, **env}, capture_output=True, text=True)
            if proc.returncode:
                rows.append({"rows": m, "env": label, "error": proc.stderr.strip().splitlines()[-1][:200]})
                print(f"{m}x{args.matmul_k}x{args.matmul_n} [{label}]: failed: {rows[-1]['error']}", flush=True)
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append({"rows": m, "k": args.matmul_k, "n": args.matmul_n, "env": label, **r})
            print(f"{m}x{args.matmul_k}x{args.matmul_n} [{label}]: "
                  + "  ".join(f"{k} {v[0]:.2f}/{v[1]:.2f}ms" for k, v in r.items()) + "  (median/min)", flush=True)
    return {"rows": rows}


# ---------------------------------------------------------------------------- plot
def plot(results: dict[str, Any], path: str) -> None:
    """Accuracy against speed-up over f32: CNN top-1 agreement (left), encoder cosine (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    cnn = results.get("cnn", {}).get("rows", [])
    ax = axes[0]
    for model in dict.fromkeys(r["model"] for r in cnn):
        rs = [r for r in cnn if r["model"] == model]
        f32 = next(r["ms"] for r in rs if r["variant"] == "f32")
        for r in rs:
            ax.scatter(f32 / r["ms"], 100 * r["top1_agreement"], label=f"{model} {r['variant']}")
            ax.annotate(f"{model[:6]} {r['variant']}", (f32 / r["ms"], 100 * r["top1_agreement"]), fontsize=7)
    ax.axhline(99, ls="--", c="gray", lw=0.8)
    ax.set_xlabel("speed vs our f32 (x, higher is faster)")
    ax.set_ylabel("top-1 agreement with f32 (%)")
    ax.set_title(f"light CNNs, batch {results.get('cnn', {}).get('batch', '?')} (He weights, fitted head)")
    enc = results.get("encoder", {}).get("rows", [])
    ax = axes[1]
    for (b, t) in dict.fromkeys((r["batch"], r["tokens"]) for r in enc):
        rs = [r for r in enc if (r["batch"], r["tokens"]) == (b, t)]
        f32 = next(r["ms"] for r in rs if r["variant"] == "f32")
        for r in rs:
            ax.scatter(f32 / r["ms"], r["cosine_vs_f32"], marker="o" if not r["variant"].startswith("ort") else "x")
            ax.annotate(f"{b}x{t} {r['variant']}", (f32 / r["ms"], r["cosine_vs_f32"]), fontsize=7)
    ax.set_xlabel("speed vs our f32 (x)")
    ax.set_ylabel("output cosine vs our f32")
    ax.set_title("encoder d1024/ffn4096 x4, batch x tokens")
    loads = {k: round(v.get("machine", {}).get("load", [0])[0], 1) for k, v in results.items() if isinstance(v, dict)}
    fig.suptitle(f"jaxinfer quantization on CPU ({os.cpu_count()} shared cores; 1-min load when each part ended: {loads})")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="encoder,cnn,matmul")
    p.add_argument("--shapes", default="1x8,4x32", help="encoder: batch x tokens, comma separated")
    p.add_argument("--tune", action="store_true", help="encoder: Model.tune (time XLA CPU option sets per shape)")
    p.add_argument("--timing", choices=("blocks", "interleaved"), default="blocks",
                   help="encoder: blocks of back-to-back calls per variant (default) or calls in turn")
    p.add_argument("--variants", default="f32,int8-weight,int8-dynamic,bf16,ortq-jaxinfer,ort-f32,ort-int8")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=4096)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--cnn", default="squeezenet,resnet50", help="light CNNs (name substrings)")
    p.add_argument("--cnn-variants", default=CNN_VARIANTS)
    p.add_argument("--cnn-images", type=int, default=128)
    p.add_argument("--cnn-batch", type=int, default=8)
    p.add_argument("--cnn-runs", type=int, default=5)
    p.add_argument("--matmul-rows", default="8,64,512")
    p.add_argument("--matmul-k", type=int, default=1024)
    p.add_argument("--matmul-n", type=int, default=4096)
    p.add_argument("--json", default="benchmarks/results/quantization.json")
    p.add_argument("--plot", default="benchmarks/results/quantization.png")
    args = p.parse_args()
    path = Path(args.json)
    results = json.loads(path.read_text()) if path.exists() else {}
    if "rows" in results and "encoder" not in results:  # the older single-part layout
        results = {"encoder": {k: results[k] for k in ("model", "runs", "rows", "crossover_tokens") if k in results}}
    parts = {"encoder": encoder_part, "cnn": cnn_part, "matmul": matmul_part}
    for name in args.parts.split(","):
        old = results.get(name, {})
        results[name] = parts[name](args)
        if name == "cnn":  # keep earlier runs' rows for the models not rerun now
            new = {r["model"] for r in results[name]["rows"]}
            results[name]["rows"] = [r for r in old.get("rows", []) if r["model"] not in new] + results[name]["rows"]
        results[name]["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "load": os.getloadavg()}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1))
        print(f"wrote {path}")
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
