"""Control flow (ai.onnx): If, Loop, Scan as lax.cond / while_loop / scan.

Bodies are ``Subgraph`` callables closing over the enclosing scope. When the
values that steer control (the If condition, a Loop's trip count and
condition) are known at trace time, the taken branch is called directly and
loops whose state holds sequences or optionals are unrolled; otherwise the
lax primitives keep the whole graph in one XLA computation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ....errors import JaxinferError
from ....registry import OpDef, registrar
from ....tracer import is_concrete

OPS: list[OpDef] = []
op = registrar(OPS)

#: A Loop whose body needs its iteration number at trace time (a Slice bound,
#: a shape) is unrolled when its trip count is known and at most this.
UNROLL_LIMIT = 4096
#: Unrolled loops without a trip count stop with an error after this many steps.
UNBOUNDED_LIMIT = 1 << 20


def _scalar_bool(value: Any, what: str) -> Any:
    if np.size(value) != 1:
        raise ValueError(f"{what} must hold exactly one element, got shape {np.shape(value)}")
    if is_concrete(value):
        return bool(np.asarray(value).reshape(()))
    return jnp.reshape(value, ()).astype(jnp.bool_)


def _is_tensor(value: Any) -> bool:
    return value is not None and not isinstance(value, (list, tuple))


class _ShapeChange(ValueError):
    """A loop-carried value changes shape: a lax carry cannot, an unrolled loop can."""


def _like(value: Any, ref: Any, what: str) -> jax.Array:
    """``value`` as ``ref``'s dtype; its shape must be ``ref``'s (a lax carry keeps its type)."""
    if not _is_tensor(value):
        raise _ShapeChange(f"{what} is a {type(value).__name__} after an iteration, expected a tensor")
    if jnp.shape(value) != jnp.shape(ref):
        raise _ShapeChange(
            f"{what} changes shape across iterations ({jnp.shape(ref)} -> {jnp.shape(value)}); "
            "that is only supported when the loop's values are known at trace time")
    return jnp.asarray(value).astype(jnp.result_type(ref))


# ---------------------------------------------------------------------- If

@op("If", (1, 11, 13, 16, 19, 21, 23, 24, 25))
def if_(cond, *, then_branch: Callable, else_branch: Callable):
    """https://onnx.ai/onnx/operators/onnx__If.html: a known condition calls the taken branch."""
    c = _scalar_bool(cond, "If: cond")
    if isinstance(c, bool):
        return tuple(then_branch() if c else else_branch())
    try:
        return tuple(lax.cond(c, lambda: tuple(then_branch()), lambda: tuple(else_branch())))
    except TypeError as e:
        raise ValueError(
            "If: with a condition computed at run time both branches must produce outputs of the same "
            f"structure, shapes and dtypes: {e}") from e


# -------------------------------------------------------------------- Loop

def _zero_trip_scan_outputs(body: Callable, n_carried: int, carried: Sequence[Any]) -> list[Any]:
    """Empty scan outputs (leading dim 0), their element types read off an abstract body call."""
    shapes = jax.eval_shape(lambda *v: tuple(body(np.int64(0), np.bool_(True), *v)), *carried)
    return [jnp.zeros((0,) + s.shape, s.dtype) for s in shapes[1 + n_carried:]]


def _stack(values: list[Any], k: int) -> jax.Array:
    shapes = {jnp.shape(v) for v in values}
    if len(shapes) > 1:
        raise ValueError(f"Loop: scan output #{k} has different shapes across iterations {sorted(shapes)}; "
                         "ONNX stacks them, so they must agree")
    return jnp.stack([jnp.asarray(v) for v in values])


def _loop_unrolled(trip: int | None, body: Callable, carried: list[Any], n_scan: int,
                   first: tuple[Any, ...] | None) -> tuple[Any, ...]:
    """Run the body once per iteration at trace time (condition known at every step)."""
    n = len(carried)
    scans: list[list[Any]] = [[] for _ in range(n_scan)]
    i = 0
    while trip is None or i < trip:
        if i >= UNBOUNDED_LIMIT:
            raise ValueError(f"Loop: unrolled at trace time, the condition still holds after {i} iterations "
                             f"(trip count {trip}); expected it to turn false sooner")
        outs = first if (i == 0 and first is not None) else tuple(body(np.int64(i), np.bool_(True), *carried))
        keep = outs[0]
        if not is_concrete(keep):
            raise ValueError(
                "Loop: this loop must be unrolled at trace time (its state holds sequences/optionals, changes "
                "shape, or its body needs the iteration number at trace time), but its condition depends on "
                "run-time values; expected a condition known at trace time")
        carried = list(outs[1:1 + n])
        for k, v in enumerate(outs[1 + n:]):
            scans[k].append(v)
        i += 1
        if not _scalar_bool(keep, "Loop: cond_out"):
            break
    if i == 0:
        return tuple(carried) + tuple(_zero_trip_scan_outputs(body, n, carried))
    return tuple(carried) + tuple(_stack(s, k) for k, s in enumerate(scans))


def _loop_lax(trip: int | None, body: Callable, carried: list[Any], n_scan: int) -> tuple[Any, ...]:
    """The loop as lax.while_loop (no scan outputs) or a fixed-length lax.scan."""
    n = len(carried)
    init = [jnp.asarray(v).astype(jnp.result_type(v)) for v in carried]
    names = [f"Loop: loop-carried value #{k}" for k in range(n)]

    if n_scan == 0:
        def cond_fun(state):
            i, keep, _ = state
            return keep if trip is None else jnp.logical_and(keep, i < trip)

        def body_fun(state):
            i, keep, vals = state
            outs = tuple(body(i, keep, *vals))
            new = [_like(v, r, nm) for v, r, nm in zip(outs[1:1 + n], vals, names)]
            return i + 1, _scalar_bool(outs[0], "Loop: cond_out") | jnp.zeros((), jnp.bool_), new

        _, _, final = lax.while_loop(cond_fun, body_fun, (jnp.zeros((), jnp.int64), jnp.ones((), jnp.bool_), init))
        return tuple(final)

    if trip is None:
        raise ValueError(
            "Loop: scan outputs need a known number of iterations, but the trip count M is absent and the "
            "condition depends on run-time values; unsupported unless the loop's values are known at trace time")
    stops_early: list[bool] = []

    def step(carry, _):
        i, vals = carry
        outs = tuple(body(i, np.bool_(True), *vals))
        keep = outs[0]
        if not is_concrete(keep):
            raise ValueError(
                "Loop: with scan outputs the number of iterations must be known at trace time, but the body's "
                "condition depends on run-time values (the scan outputs would have a data-dependent length)")
        stops_early.append(not _scalar_bool(keep, "Loop: cond_out"))
        new = [_like(v, r, nm) for v, r, nm in zip(outs[1:1 + n], vals, names)]
        return (i + 1, new), tuple(jnp.asarray(v) for v in outs[1 + n:])

    start = (jnp.zeros((), jnp.int64), init)
    (_, final), ys = lax.scan(step, start, None, length=trip)
    if stops_early and stops_early[0] and trip > 1:  # a constant-false condition: exactly one iteration
        (_, final), ys = lax.scan(step, start, None, length=1)
    return tuple(final) + tuple(ys)


@op("Loop", (1, 11, 13, 16, 19, 21, 23, 24, 25), static=(0, 1))
def loop(M=None, cond=None, *v_initial, body: Callable):
    """https://onnx.ai/onnx/operators/onnx__Loop.html

    ``M`` and the initial ``cond`` are static. Loops over concrete values, or
    whose state holds sequences/optionals, are unrolled at trace time; others
    become a lax.while_loop (no scan outputs) or a lax.scan of length ``M``.
    """
    n = len(v_initial)
    n_scan = body.n_outputs - 1 - n
    if n_scan < 0:
        raise ValueError(f"Loop: body has {body.n_outputs} outputs, expected at least 1 + {n} (cond + carried)")
    trip = None if M is None else int(np.asarray(M).reshape(()))
    if trip is None and cond is None:
        raise ValueError("Loop: neither a trip count M nor a condition is given; the loop would never end")
    keep = True if cond is None else _scalar_bool(cond, "Loop: cond")
    carried = list(v_initial)
    if not keep or trip == 0:
        if n_scan and not all(_is_tensor(v) for v in carried):
            raise ValueError("Loop: zero iterations with scan outputs and sequence/optional state is unsupported")
        scans = _zero_trip_scan_outputs(body, n, carried) if n_scan else []
        return tuple(carried) + tuple(scans)
    if not all(_is_tensor(v) for v in carried):
        return _loop_unrolled(trip, body, carried, n_scan, None)
    if all(is_concrete(v) for v in carried):
        first = tuple(body(np.int64(0), np.bool_(True), *carried))
        if is_concrete(first):  # nothing traced flows in: finish it at trace time
            return _loop_unrolled(trip, body, carried, n_scan, first)
    try:
        return _loop_lax(trip, body, carried, n_scan)
    except (JaxinferError, _ShapeChange) as e:  # the body needs trace-time values or changes shapes
        if trip is None or trip > UNROLL_LIMIT:
            raise ValueError(
                f"Loop: the body cannot run as a lax loop ({e}); unrolling it at trace time needs a known "
                f"trip count M of at most {UNROLL_LIMIT}, got {trip}") from e
        return _loop_unrolled(trip, body, carried, n_scan, None)


# -------------------------------------------------------------------- Scan

def _scan_core(body: Callable, states: Sequence[Any], xs: Sequence[Any], reverse: Sequence[bool],
               out_reverse: Sequence[bool], length: int) -> tuple[list[Any], list[Any]]:
    """lax.scan over axis 0 of ``xs`` (each possibly reversed); scan outputs stacked on axis 0."""
    n = len(states)
    xs = [jnp.flip(x, 0) if r else x for x, r in zip(xs, reverse)]
    init = [jnp.asarray(s).astype(jnp.result_type(s)) for s in states]
    names = [f"Scan: state #{k}" for k in range(n)]

    def step(carry, x_slices):
        outs = tuple(body(*carry, *x_slices))
        new = [_like(v, r, nm) for v, r, nm in zip(outs[:n], carry, names)]
        return new, tuple(jnp.asarray(v) for v in outs[n:])

    final, ys = lax.scan(step, init, tuple(xs), length=length)
    ys = [jnp.flip(y, 0) if r else y for y, r in zip(ys, out_reverse)]
    return list(final), list(ys)


def _axes(values: Sequence[int] | None, count: int, ranks: Sequence[int], what: str) -> list[int]:
    vals = list(values) if values is not None else [0] * count
    if len(vals) != count:
        raise ValueError(f"Scan: {what} has {len(vals)} entries, expected {count}")
    out = []
    for v, r in zip(vals, ranks):
        if not -r <= v < r:
            raise ValueError(f"Scan: {what} value {v} out of range for rank {r}")
        out.append(v + r if v < 0 else v)
    return out


@op("Scan", (9, 11, 16, 19, 21, 23, 24, 25))
def scan(*initial_state_and_scan_inputs, body: Callable, num_scan_inputs: int,
         scan_input_axes=None, scan_input_directions=None, scan_output_axes=None, scan_output_directions=None):
    """https://onnx.ai/onnx/operators/onnx__Scan.html (opset 9+: no batch axis)."""
    args = initial_state_and_scan_inputs
    n = len(args) - num_scan_inputs
    states, xs = args[:n], args[n:]
    in_axes = _axes(scan_input_axes, num_scan_inputs, [jnp.ndim(x) for x in xs], "scan_input_axes")
    xs = [jnp.moveaxis(x, a, 0) for x, a in zip(xs, in_axes)]
    lengths = {jnp.shape(x)[0] for x in xs}
    if len(lengths) != 1:
        raise ValueError(f"Scan: scan inputs have different sequence lengths {sorted(lengths)}")
    n_out = body.n_outputs - n
    in_rev = [bool(d) for d in (scan_input_directions or [0] * num_scan_inputs)]
    out_rev = [bool(d) for d in (scan_output_directions or [0] * n_out)]
    final, ys = _scan_core(body, states, xs, in_rev, out_rev, lengths.pop())
    out_axes = _axes(scan_output_axes, n_out, [jnp.ndim(y) for y in ys], "scan_output_axes")
    return tuple(final) + tuple(jnp.moveaxis(y, 0, a) for y, a in zip(ys, out_axes))


@op("Scan", (8,))
def scan_v8(sequence_lens, *initial_state_and_scan_inputs, body: Callable, num_scan_inputs: int,
            directions=None):
    """https://onnx.ai/onnx/operators/Changelog.html#Scan-8: batch axis 0, sequence axis 1, per-batch lengths."""
    args = initial_state_and_scan_inputs
    n = len(args) - num_scan_inputs
    states, xs = args[:n], args[n:]
    batch, length = jnp.shape(xs[0])[:2]
    reverse = [bool(d) for d in (directions or [0] * num_scan_inputs)]
    n_out = body.n_outputs - n
    if sequence_lens is None:
        def one(st, x):
            return _scan_core(body, st, x, reverse, [False] * n_out, length)
        final, ys = jax.vmap(one)(list(states), list(xs))
        return tuple(final) + tuple(ys)

    lens = jnp.asarray(sequence_lens).astype(jnp.int64)
    t = jnp.arange(length)

    def one_masked(st, x, ln):
        # reverse inputs within each batch entry's own length, then mask steps past it
        idx = [jnp.where(t < ln, ln - 1 - t, t) if r else t for r in reverse]
        x = [jnp.take(v, i, axis=0) for v, i in zip(x, idx)]
        names = [f"Scan: state #{k}" for k in range(n)]

        def step(carry, inp):
            k, slices = inp
            outs = tuple(body(*carry, *slices))
            live = k < ln
            new = [jnp.where(live, _like(v, r, nm), r) for v, r, nm in zip(outs[:n], carry, names)]
            return new, tuple(jnp.where(live, jnp.asarray(v), jnp.zeros_like(v)) for v in outs[n:])

        init = [jnp.asarray(s).astype(jnp.result_type(s)) for s in st]
        return lax.scan(step, init, (t, tuple(x)))

    final, ys = jax.vmap(one_masked)(list(states), list(xs), lens)
    return tuple(final) + tuple(ys)
