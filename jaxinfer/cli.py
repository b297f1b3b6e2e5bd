"""The ``jaxinfer`` command: ``info``, ``run``, ``bench``, ``quantize``, ``serve``.

Examples::

    jaxinfer info model.onnx
    jaxinfer run model.onnx --input x=x.npy
    jaxinfer bench model.onnx --batch 1,8 --json out.json      # against onnxruntime (LiteRT for .tflite)
    jaxinfer quantize model.onnx --method int8-static --calibration calib/ --exclude 'lm_head*' -o out/
    jaxinfer serve [REPO] --port 8000
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import JaxinferError, NewerOpsetWarning, newer_opset_message


class CliError(JaxinferError):
    """A command-line argument or a file it names cannot be used; ``main`` prints it and exits 2."""


# --------------------------------------------------------------------------- argument types
def positive_int(text: str) -> int:
    """argparse ``type=``: an int >= 1 (batch sizes, device counts, run counts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}; expected a positive integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive; expected an integer >= 1")
    return value


def batch_list(text: str) -> list[int]:
    """argparse ``type=``: comma-separated positive batch sizes (``1,8``)."""
    sizes = []
    for item in str(text).split(","):
        try:
            sizes.append(positive_int(item.strip()))
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"invalid batch size {item!r} in {text!r}; expected comma-separated "
                                             "positive integers like 1,8") from None
    return sizes


def non_negative_float(text: str) -> float:
    """argparse ``type=``: a float >= 0 (seconds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; expected a number >= 0")
    return value


def _check_out_dir(path: str, flag: str) -> None:
    """CliError when output directory ``path`` (given as ``flag``) is an existing non-directory."""
    if Path(path).exists() and not Path(path).is_dir():
        raise CliError(f"{flag} ({path}): an existing file, not a directory; expected a directory "
                       "(created if missing)")


def _read_npy(path: str | Path, what: str) -> np.ndarray:
    """The array in .npy file ``path``; CliError naming ``what`` and the path when it is not one."""
    from numpy.lib import format as npy_format

    expected = "expected a numeric or bool array written by numpy.save"
    try:
        with open(path, "rb") as f:
            try:
                version = npy_format.read_magic(f)
                readers = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}
                header = readers[version](f) if version in readers else None
            except ValueError:
                raise CliError(f"{what} ({path}): not a .npy file (no \\x93NUMPY header); {expected}") from None
            if header is not None and header[2].hasobject:
                raise CliError(f"{what} ({path}): holds a Python object array (dtype {header[2]}), which is never "
                               f"unpickled; {expected}")
            f.seek(0)
            return np.load(f, allow_pickle=False)
    except IsADirectoryError:
        raise CliError(f"{what} ({path}): a directory; {expected}") from None
    except OSError as e:
        raise CliError(f"{what} ({path}): {e.strerror or e}; {expected}") from None
    except ValueError as e:  # a valid header but truncated or inconsistent data
        raise CliError(f"{what} ({path}): corrupt .npy file ({e}); {expected}") from None


def resolve_model(path: str) -> str:
    """A path, or the name of a real model a dependency ships (``squeezenet``, ``resnet50``, ...)."""
    if Path(path).exists():
        return path
    from .bench import light_models

    for candidate in light_models():
        if path in (candidate.stem, candidate.stem.removeprefix("light_")):
            return str(candidate)
    return path


def _load(path: str) -> Any:
    import jaxinfer

    return jaxinfer.load(resolve_model(path))


def _read_graph(path: Path) -> tuple[Any, Any]:
    """(graph, registry) of a model file, without building the Model."""
    if not path.is_file():
        state = "a directory" if path.is_dir() else "not found"
        raise CliError(f"model file ({path}): {state}; expected an .onnx or .tflite file")
    with open(path, "rb") as f:
        head = f.read(8)
    if path.suffix.lower() == ".tflite" or head[4:8] == b"TFL3":
        from .converters.tflite import REGISTRY as tfl_registry
        from .converters.tflite import read_model as read_tflite

        return read_tflite(path), tfl_registry
    from .converters.onnx import REGISTRY as onnx_registry
    from .converters.onnx import read_model as read_onnx

    return read_onnx(path), onnx_registry


def cmd_info(args: argparse.Namespace) -> int:
    from .tracer import unsupported_ops

    path = Path(resolve_model(args.model))
    if args.passes:
        return _print_passes(path, args.json)
    if path.is_file():
        graph, registry = _read_graph(path)
        missing = unsupported_ops(graph, registry)
        if missing:
            info = {
                "source": str(path), "format": graph.fmt, "inputs": [str(v.name) for v in graph.inputs],
                "outputs": [str(v.name) for v in graph.outputs], "opsets": dict(graph.opsets),
                "ops": graph.op_histogram(), "params_bytes": graph.params_bytes(),
                "notes": [newer_opset_message(*found) for found in registry.newer_opsets(graph.opsets)],
                "unsupported": [str(m) for m in missing],
            }
            _print_info(info, args.json)
            return 1
    with warnings.catch_warnings():  # info lists them as notes
        warnings.simplefilter("ignore", NewerOpsetWarning)
        model = _load(str(path))
    info = model.info()
    info["unsupported"] = []
    _print_info(info, args.json)
    return 0


def _print_passes(path: Path, as_json: bool) -> int:
    """Node/initializer counts before and after each default graph pass."""
    from . import passes

    graph, registry = _read_graph(path)
    rows = [{"pass": "(as read)", **passes.counts(graph)}]
    for p in passes.pipeline(registry):
        graph = p(graph)
        rows.append({"pass": p.__name__, **passes.counts(graph)})
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        from .bench import table

        print(table(rows, ["pass", "nodes", "initializers", "params_bytes"]))
    return 0


def _print_info(info: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(info, indent=2, default=str))
        return
    print(f"model:    {info['source']} ({info['format']})")
    print(f"opsets:   {info['opsets']}")
    print("inputs:   " + "\n          ".join(info["inputs"]))
    print("outputs:  " + "\n          ".join(info["outputs"]))
    print(f"params:   {info.get('params', '?')} tensors, {info['params_bytes']:,} bytes")
    print("ops:      " + ", ".join(f"{k} x{v}" for k, v in info["ops"].items()))
    for note in info.get("notes", []):
        print(f"note:     {note}")
    if info.get("unsupported"):
        print("UNSUPPORTED:\n  " + "\n  ".join(info["unsupported"]))


def _parse_inputs(items: Sequence[str]) -> dict[str, np.ndarray]:
    """``--input NAME=FILE.npy`` items as {name: array}; CliError naming the item or file that is wrong."""
    feeds = {}
    for item in items:
        if "=" not in item:
            raise CliError(f"--input expects NAME=FILE.npy, got {item!r}")
        name, file = item.split("=", 1)
        feeds[name] = _read_npy(file, f"--input {name}")
    return feeds


def cmd_run(args: argparse.Namespace) -> int:
    from .bench import dummy_inputs

    if args.save:
        _check_out_dir(args.save, "--save")
    feeds = _parse_inputs(args.input or [])
    model = _load(args.model)
    given = set(feeds)
    missing = [s for s in model.inputs if s.name not in given]
    if missing:
        feeds.update(dummy_inputs(missing, args.batch, kind="random"))
        print(f"random inputs for: {', '.join(str(s) for s in missing)}")
    outs = model.run(feeds)
    for name, value in outs.items():
        arr = np.asarray(value)
        if arr.dtype.kind in "fciub" and arr.size:
            stats = f"min {arr.min():.6g}  max {arr.max():.6g}  mean {arr.astype(np.float64).mean():.6g}"
            if arr.ndim == 2 and arr.dtype.kind == "f":
                stats += f"  argmax {arr.argmax(axis=-1).tolist()[:8]}"
        else:
            stats = ""
        print(f"{name}: {arr.dtype}{list(arr.shape)}  {stats}")
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            np.save(Path(args.save) / f"{name.replace('/', '_')}.npy", arr)
    return 0


def _bench_model(model: Any, label: str, batches: Sequence[int], runs: int, min_block_s: float) -> list[Any]:
    """jaxinfer-only timing rows of a loaded ``model`` (TFLite, saved directories: no onnxruntime twin)."""
    import time

    from .bench import BenchRow, blocked, dummy_inputs

    rows = []
    for batch in batches:
        feeds = dummy_inputs(model.inputs, batch)
        t0 = time.perf_counter()
        model.run(feeds)
        compile_s = time.perf_counter() - t0
        (ms,) = blocked([lambda: model.run(feeds)], runs, min_block_s=min_block_s)
        rows.append(BenchRow(label, batch, ms, None, None, None, compile_s))
    return rows


#: The engine each model file is compared against by default (``--against auto``).
REFERENCE_OF = {"onnx": "onnxruntime", "tflite": "litert"}


def cmd_bench(args: argparse.Namespace) -> int:
    """Time the model at each ``--batch``: ONNX files against onnxruntime, TFLite files against LiteRT,
    saved directories (and ``--against none``) jaxinfer alone."""
    from .bench import compare, compare_tflite, geomean, table

    batches = args.batch
    path = resolve_model(args.model)
    model = _load(args.model)  # a clean ModelLoadError for a missing or corrupt model, whatever its format
    fmt, is_file = model.graph.fmt, Path(path).is_file()
    against = args.against
    if against == "auto":
        against = REFERENCE_OF.get(fmt) if is_file else None
    if fmt == "onnx" and is_file and against in ("onnxruntime", None):
        del model  # compare re-reads the proto, re-stamping a fixed batch dim per batch size
        rows = compare(path, batches, runs=args.runs, against=against, min_block_s=args.min_block_s)
    elif fmt == "tflite" and is_file and against == "litert":
        del model
        try:
            rows = compare_tflite(path, batches, runs=args.runs, min_block_s=args.min_block_s)
        except ImportError as e:
            raise JaxinferError(f"--against litert needs LiteRT (pip install ai-edge-litert, or the [bench] "
                                f"extra); or pass --against none: {e}") from None
    else:
        if against:
            print(f"note: --against {against} compares .{'tflite' if against == 'litert' else 'onnx'} files; "
                  f"timing jaxinfer alone on {path}", file=sys.stderr)
        rows = _bench_model(model, Path(path).stem, batches, args.runs, args.min_block_s)
    reference = rows[0].reference if rows and rows[0].reference_ms is not None else "onnxruntime"
    dicts = [r.as_dict() for r in rows]
    print(table(dicts, ["model", "batch", "jaxinfer_ms", f"{reference}_ms", "ratio", "max_abs_diff", "compile_s"]))
    ratios = [r.ratio for r in rows if r.ratio]
    if ratios:
        print(f"geomean ratio jaxinfer/{reference}: {geomean(ratios):.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(dicts, indent=2))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .serve import main as serve_main
    except ImportError as e:
        raise SystemExit(f"serving is not available: {e}") from e
    return int(serve_main(args.rest) or 0)


def cmd_quantize(args: argparse.Namespace) -> int:
    """Quantize (optionally after pruning), save with ``jaxinfer.save``, print the report."""
    import jaxinfer
    from .quant import canonical
    from .quant.calibrate import read_npy_dir

    try:
        method = canonical(args.method)
    except ValueError as e:
        print(f"jaxinfer: error: {e}", file=sys.stderr)
        return 2
    if method in ("int8-static", "auto") and not args.calibration:
        print(f"jaxinfer: error: --method {args.method} needs --calibration DIR (activation scales / the accuracy "
              "budget are measured on it); see 'jaxinfer quantize --help' for the layout", file=sys.stderr)
        return 2
    _check_out_dir(args.output, "-o/--output")
    model = _load(args.model)
    data = _read_calibration(args.calibration, [s.name for s in model.inputs]) if args.calibration else None
    budget = dict(_parse_budget(b) for b in args.budget or []) or None
    try:
        if args.prune:
            model = jaxinfer.prune(model, args.prune, exclude=args.exclude or (), calibration=data)
        q = jaxinfer.quantize(model, method, exclude=args.exclude or (), calibration=data, budget=budget,
                              granularity=args.granularity, observer=args.observer)
    except ValueError as e:
        print(f"jaxinfer: error: {e}", file=sys.stderr)
        return 2
    rep = q.report()
    if args.prune:
        pr = model.report().totals
        rep.totals["pruning"] = {k: pr[k] for k in ("sparsity", "criterion", "params_bytes_f32", "params_bytes",
                                                     "pruned_layers")}
    out = jaxinfer.save(q, args.output)
    if args.json:
        print(rep.to_json())
    elif args.report:
        print(rep)
    t = rep.totals
    print(f"saved {method} model to {out} (params {t.get('params_bytes_f32', 0):,} -> {t.get('params_bytes', 0):,} "
          f"bytes; {t.get('quantized_layers', 0)} layers quantized)", file=sys.stderr if args.json else sys.stdout)
    return 0


def _read_calibration(directory: str, input_names: Sequence[str]) -> list[dict[str, np.ndarray]]:
    """``read_npy_dir``, with a file that is not a numeric .npy array named in a CliError."""
    from .quant.calibrate import CalibrationError, read_npy_dir

    try:
        return read_npy_dir(directory, input_names)
    except CalibrationError:
        raise
    except (OSError, ValueError) as e:
        root = Path(directory)
        for file in sorted(root.glob("*.npy")) + sorted(root.glob("*/*.npy")):
            _read_npy(file, "--calibration file")  # raises the CliError naming the bad file
        raise CliError(f"--calibration ({directory}): cannot read the .npy files ({e})") from e


def _parse_budget(item: str) -> tuple[str, float]:
    key, _, value = item.partition("=")
    try:
        return key, float(value)
    except ValueError:
        raise CliError(f"--budget expects KEY=NUMBER (cosine=0.999, top1_agreement=0.99), got {item!r}") from None


def cmd_plan(args: argparse.Namespace) -> int:
    from .sharding import plan

    import jax

    devices = args.devices if args.devices is not None else len(jax.devices())
    p = plan(_load(args.model), devices=devices, batch=args.batch, memory_limit=args.memory_limit)
    print(p.table())
    print(f"best: {p.best}")
    if args.json:
        Path(args.json).write_text(p.to_json())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxinfer", description="ONNX/TFLite models as jitted JAX functions")
    sub = p.add_subparsers(dest="cmd", required=True)

    info = sub.add_parser("info", help="inputs, outputs, opsets, op histogram, params bytes, unsupported ops")
    info.add_argument("model")
    info.add_argument("--json", action="store_true")
    info.add_argument("--passes", action="store_true", help="node counts before/after each graph pass")
    info.set_defaults(func=cmd_info)

    run = sub.add_parser("run", help="run a model on .npy inputs (random ones where none are given)")
    run.add_argument("model", help="a model file, or a model a dependency ships: squeezenet, resnet50, ...")
    run.add_argument("--input", action="append", metavar="NAME=FILE.npy")
    run.add_argument("--batch", type=positive_int, default=None,
                     help="batch size for random inputs with a symbolic batch dim")
    run.add_argument("--save", metavar="DIR", help="write each output as DIR/<name>.npy")
    run.set_defaults(func=cmd_run)

    from .bench import MIN_BLOCK_S

    bench = sub.add_parser("bench", help="median latency vs onnxruntime (.onnx) or LiteRT (.tflite), in one process")
    bench.add_argument("model")
    bench.add_argument("--batch", type=batch_list, default=[1], metavar="N[,N...]",
                       help="comma-separated batch sizes (default 1)")
    bench.add_argument("--runs", type=positive_int, default=20)
    bench.add_argument("--min-block-s", type=non_negative_float, default=MIN_BLOCK_S,
                       help="each engine's timing block lasts at least this long (more calls for fast models)")
    bench.add_argument("--against", choices=["auto", "onnxruntime", "litert", "none"], default="auto",
                       help="the engine to compare with: auto = onnxruntime for .onnx, LiteRT for .tflite files")
    bench.add_argument("--json", metavar="FILE")
    bench.set_defaults(func=cmd_bench)

    from .quant import ALIASES, METHODS
    from .quant.calibrate import CALIBRATION_LAYOUT, OBSERVERS

    qz = sub.add_parser(
        "quantize", help="quantize a model (bf16/fp16/int8/auto) and save it with jaxinfer.save",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Quantize MODEL and save it (graph + orbax params) to OUT_DIR; jaxinfer.load(OUT_DIR) "
                    "reloads it without recalibration.",
        epilog=f"calibration (--calibration DIR, required by int8-static and auto):\n{CALIBRATION_LAYOUT}\n\n"
               "example:\n  jaxinfer quantize model.onnx --method int8-static --calibration calib/ "
               "--exclude 'lm_head*' -o out/ --report")
    qz.add_argument("model", help="a model file, a saved directory, or a model a dependency ships (squeezenet, ...)")
    qz.add_argument("--method", default="int8-dynamic",
                    help=f"one of {', '.join(METHODS)} (or an alias: {', '.join(sorted(ALIASES))}); default int8-dynamic")
    qz.add_argument("--calibration", metavar="DIR", help="a directory of .npy inputs (layout below)")
    qz.add_argument("--exclude", action="append", metavar="GLOB",
                    help="keep matching layers in float: node names, op:Type, weight names (repeatable)")
    qz.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="where to save the quantized model")
    qz.add_argument("--observer", choices=OBSERVERS, default="minmax", help="int8-static activation ranges")
    qz.add_argument("--granularity", choices=["per_channel", "per_tensor"], default="per_channel")
    qz.add_argument("--budget", action="append", metavar="KEY=VALUE",
                    help="for auto: cosine=0.999 and/or top1_agreement=0.99")
    qz.add_argument("--prune", type=float, metavar="SPARSITY",
                    help="first remove this fraction of output channels per layer (jaxinfer.prune, L1 norm)")
    qz.add_argument("--report", action="store_true", help="print the per-layer report")
    qz.add_argument("--json", action="store_true", help="print the report as JSON (the summary goes to stderr)")
    qz.set_defaults(func=cmd_quantize)

    pl = sub.add_parser("plan", help="rank data x tensor meshes for this model (compile, memory, timed run)")
    pl.add_argument("model")
    pl.add_argument("--devices", type=positive_int, default=None, help="default: every visible device")
    pl.add_argument("--batch", type=positive_int, default=1)
    pl.add_argument("--memory-limit", type=positive_int, default=None, metavar="BYTES")
    pl.add_argument("--json", metavar="FILE")
    pl.set_defaults(func=cmd_plan)

    serve = sub.add_parser("serve", help="serve a model repository over KServe v2 HTTP", add_help=False)
    serve.add_argument("rest", nargs=argparse.REMAINDER)
    serve.set_defaults(func=cmd_serve)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command ``argv`` names; a jaxinfer or file-system error prints ``jaxinfer: error: ...`` (exit 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:  # the serving command parses its own options
        try:
            from .serve import main as serve_main
        except ImportError as e:
            raise SystemExit(f"serving is not available: {e}") from e
        return int(serve_main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    if getattr(args, "against", None) == "none":
        args.against = None
    try:
        return int(args.func(args) or 0)
    except JaxinferError as e:
        print(f"jaxinfer: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file the command reads or writes (--json FILE, an output directory, ...)
        where = f" ({e.filename})" if e.filename else ""
        print(f"jaxinfer: error: {args.cmd}{where}: {e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
