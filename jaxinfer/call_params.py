"""How a :class:`~jaxinfer.model.Model`'s executables take its params: a tuple in a fixed order, and the
one-value params (quantization scales and zero points, mostly) packed into one array per dtype.

Each argument of a jitted call costs the dispatch ~0.3 us on the host (flattening the pytree, checking the
array's signature, preparing its buffer) whatever its size, and a dict's keys are sorted on every call
(112 arrays: 48 us as a dict, 35 as a list, 9 as one array). The statically quantized BERT fixtures have 112
params, 84 of them scalars: packing those took 55-110 us off their ~350 us batch-1 runs and 95-120 off ~1.1 ms
at batch 8 (session 29, one process). Inside the program a scalar is read back with a static index, which XLA
folds into its readers; larger params stay arguments of their own (slices of a packed vector became copies
in front of the kernels and broke XLA's fusions: bert_legacy b8 +90 us). ``Model.params`` stays a dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

#: Fewer scalars than this are passed as they are (packing saves less than reading them back costs).
MIN_SCALARS = 4

CallParams = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass(frozen=True)
class ParamLayout:
    """``names``: the params passed as they are, in this order; ``slots``: (name, dtype name, index, shape) of
    each packed scalar."""

    names: tuple[str, ...] = ()
    slots: tuple[tuple[str, str, int, tuple[int, ...]], ...] = ()

    def pack(self, params: Mapping[str, Any]) -> CallParams:
        """The call params for ``params`` (of this layout): the arrays in order, and one 1-D array per dtype of
        the scalars (on the scalars' device)."""
        groups: dict[str, list[Any]] = {}
        for name, dtype, _, _ in self.slots:
            groups.setdefault(dtype, []).append(jnp.reshape(params[name], (1,)))
        return tuple(params[n] for n in self.names), {d: jnp.concatenate(parts) for d, parts in groups.items()}

    def unpack(self, call_params: CallParams) -> dict[str, Any]:
        """The params dict back from :meth:`pack`'s call params (inside a traced program: static slices)."""
        arrays, packed = call_params
        out = dict(zip(self.names, arrays))
        for name, dtype, index, shape in self.slots:
            out[name] = jnp.reshape(packed[dtype][index], shape)
        return out


def _is_scalar(v: Any) -> bool:
    return (isinstance(v, (jax.Array, np.ndarray)) and v.size == 1
            and (np.issubdtype(v.dtype, np.number) or v.dtype == np.bool_))


def param_layout(params: Mapping[str, Any]) -> ParamLayout:
    """The layout for ``params``: every entry in order, except the one-value arrays (any shape of one element,
    numeric or bool), packed by dtype when there are :data:`MIN_SCALARS` or more, all on one device."""
    chosen = [(k, v) for k, v in params.items() if _is_scalar(v)]
    places = {frozenset(v.devices()) for _, v in chosen if isinstance(v, jax.Array)}
    if len(chosen) < MIN_SCALARS or len(places) > 1 or any(len(p) != 1 for p in places):
        return ParamLayout(tuple(params))
    counts: dict[str, int] = {}
    slots = []
    for name, v in chosen:
        dtype = np.dtype(v.dtype).name
        slots.append((name, dtype, counts.get(dtype, 0), tuple(v.shape)))
        counts[dtype] = counts.get(dtype, 0) + 1
    packed = {name for name, _ in chosen}
    return ParamLayout(tuple(k for k in params if k not in packed), tuple(slots))


class LaidOutCall:
    """An executable compiled over a :class:`ParamLayout`'s call params. :meth:`packed` takes those; called with
    the params dict (``exe(params, inputs)``, as a plain jitted model program is) it packs them first. Anything
    else (``as_text``, ``cost_analysis``, ...) is the executable's."""

    __slots__ = ("exe", "layout")

    def __init__(self, exe: Any, layout: ParamLayout):
        self.exe, self.layout = exe, layout

    def __call__(self, params: Mapping[str, Any], *rest: Any) -> Any:
        return self.exe(self.layout.pack(params), *rest)

    def packed(self, call_params: CallParams, *rest: Any) -> Any:
        return self.exe(call_params, *rest)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.exe, name)
