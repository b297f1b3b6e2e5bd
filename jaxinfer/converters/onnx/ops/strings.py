"""String ops (ai.onnx), evaluated on the host: strings never enter XLA.

String tensors are numpy object arrays of ``str`` and are always concrete at
trace time (string graph inputs are value inputs), so these ops run eagerly with
numpy. TfIdfVectorizer also counts integer n-grams, which runs in JAX.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ....registry import OpDef, registrar

OPS: list[OpDef] = []
op = registrar(OPS)


def _text(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _strings(x: Any, op_type: str) -> np.ndarray:
    """``x`` as an object array of ``str`` (bytes decoded as UTF-8)."""
    if isinstance(x, jax.core.Tracer):
        raise ValueError(f"{op_type} wants a string tensor known at trace time, got a runtime tensor")
    arr = np.asarray(x)
    if arr.dtype != np.dtype(object) and arr.dtype.kind not in "US":
        raise ValueError(f"{op_type} wants a string tensor, got {arr.dtype}")
    out = np.empty(arr.shape, dtype=object)
    out.reshape(-1)[:] = [_text(v) for v in arr.reshape(-1).tolist()]
    return out


def _map(fn: Any, x: np.ndarray, dtype: Any = object) -> np.ndarray:
    out = np.empty(x.shape, dtype=dtype)
    out.reshape(-1)[:] = [fn(v) for v in x.reshape(-1).tolist()]
    return out


@op("StringConcat", 20)
def string_concat(x, y):
    """https://onnx.ai/onnx/operators/onnx__StringConcat.html: elementwise x + y, broadcasting."""
    a, b = np.broadcast_arrays(_strings(x, "StringConcat"), _strings(y, "StringConcat"))
    out = np.empty(a.shape, dtype=object)
    out.reshape(-1)[:] = [p + q for p, q in zip(a.reshape(-1).tolist(), b.reshape(-1).tolist())]
    return out


# RE2 POSIX classes (valid only inside brackets) -> their ASCII ranges in Python's syntax.
_POSIX = {
    "alnum": "0-9A-Za-z", "alpha": "A-Za-z", "ascii": "\\x00-\\x7f", "blank": " \\t",
    "cntrl": "\\x00-\\x1f\\x7f", "digit": "0-9", "graph": "\\x21-\\x7e", "lower": "a-z",
    "print": "\\x20-\\x7e", "punct": "!-/:-@\\[-`{-~", "space": "\\t\\n\\v\\f\\r ", "upper": "A-Z",
    "word": "0-9A-Za-z_", "xdigit": "0-9A-Fa-f",
}
_UNSUPPORTED_RE2 = (("(?=", "lookahead"), ("(?!", "negative lookahead"), ("(?<=", "lookbehind"),
                    ("(?<!", "negative lookbehind"), ("[:^", "negated POSIX class"), ("\\p", "Unicode class \\p"),
                    ("\\P", "Unicode class \\P"), ("\\Q", "\\Q...\\E quoting"), ("\\C", "\\C"))


def _re2_to_python(pattern: str) -> re.Pattern[str]:
    """Compile an RE2 pattern with Python's ``re``: ASCII Perl classes as in RE2, POSIX classes
    translated; constructs the two engines read differently are refused, never guessed."""
    for token, name in _UNSUPPORTED_RE2:
        if token in pattern:
            raise ValueError(f"RegexFullMatch pattern {pattern!r} uses {name}, which is not supported "
                             "here (RE2 semantics are emulated with Python's re)")
    if re.search(r"\\[1-9]", pattern):
        raise ValueError(f"RegexFullMatch pattern {pattern!r} uses a backreference, which RE2 does not allow")

    def posix(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in _POSIX:
            raise ValueError(f"RegexFullMatch pattern {pattern!r}: unknown POSIX class [:{name}:]")
        return _POSIX[name]

    translated = re.sub(r"\[:([a-z]+):\]", posix, pattern)
    try:
        return re.compile(translated, re.ASCII)
    except re.error as e:
        raise ValueError(f"RegexFullMatch pattern {pattern!r} is not a valid regular expression: {e}") from e


@op("RegexFullMatch", 20)
def regex_full_match(x, *, pattern: str):
    """https://onnx.ai/onnx/operators/onnx__RegexFullMatch.html: True where the whole string matches."""
    rx = _re2_to_python(_text(pattern))
    return _map(lambda s: rx.fullmatch(s) is not None, _strings(x, "RegexFullMatch"), bool)


def _split(s: str, sep: str | None, limit: int) -> list[str]:
    """str.split, except a whitespace split's unsplit remainder loses trailing whitespace (as onnxruntime)."""
    parts = s.split(sep, limit)
    if sep is None and parts:
        parts[-1] = parts[-1].rstrip()
    return parts


@op("StringSplit", 20)
def string_split(x, *, delimiter: str | None = None, maxsplit: int | None = None):
    """https://onnx.ai/onnx/operators/onnx__StringSplit.html

    Returns the substrings padded with "" to the longest split (shape x.shape + [max]) and the
    number of substrings per element. No (or an empty) delimiter splits on runs of whitespace.
    """
    strings = _strings(x, "StringSplit")
    sep = _text(delimiter) if delimiter else None
    limit = -1 if maxsplit is None else int(maxsplit)
    parts = [_split(s, sep, limit) for s in strings.reshape(-1).tolist()]
    width = max((len(p) for p in parts), default=0)
    out = np.full((len(parts), width), "", dtype=object)
    for i, p in enumerate(parts):
        out[i, :len(p)] = p
    counts = np.asarray([len(p) for p in parts], np.int64).reshape(strings.shape)
    return out.reshape(*strings.shape, width), counts


@op("StringNormalizer", 10)
def string_normalizer(x, *, case_change_action: str = "NONE", is_case_sensitive: int = 0,
                      locale: str = "", stopwords: tuple[str, ...] = ()):
    """https://onnx.ai/onnx/operators/onnx__StringNormalizer.html

    Case changes use Unicode's default (locale-independent) mappings.
    """
    del locale  # Python's str.lower/upper apply the Unicode default mapping for every locale
    action = _text(case_change_action)
    if action not in ("NONE", "LOWER", "UPPER"):
        raise ValueError(f"StringNormalizer case_change_action must be NONE, LOWER or UPPER, got '{action}'")
    strings = _strings(x, "StringNormalizer")
    if strings.ndim not in (1, 2) or (strings.ndim == 2 and strings.shape[0] != 1):
        raise ValueError(f"StringNormalizer takes a [C] or [1, C] tensor, got shape {strings.shape}")
    row = strings.reshape(-1).tolist()
    if stopwords:
        if is_case_sensitive:
            stop = {_text(w) for w in stopwords}
            row = [s for s in row if s not in stop]
        else:
            stop = {_text(w).lower() for w in stopwords}
            row = [s for s in row if s.lower() not in stop]
    if action == "LOWER":
        row = [s.lower() for s in row]
    elif action == "UPPER":
        row = [s.upper() for s in row]
    if not row:
        row = [""]
    out = np.empty(len(row), dtype=object)
    out[:] = row
    return out.reshape(1, -1) if strings.ndim == 2 else out


# --------------------------------------------------------------------------- TfIdfVectorizer


def _pool_ngrams(pool: np.ndarray, ngram_counts: tuple[int, ...]) -> list[tuple[int, np.ndarray]]:
    """Split the flat pool into (n, [count, n] n-grams) per n-gram length, in pool order."""
    starts = [int(c) for c in ngram_counts] + [len(pool)]
    groups = []
    for k in range(len(ngram_counts)):
        n = k + 1
        chunk = pool[starts[k]:starts[k + 1]]
        if len(chunk) % n:
            raise ValueError(f"TfIdfVectorizer: the pool's {n}-grams hold {len(chunk)} items, not a multiple of {n}")
        groups.append((n, chunk.reshape(-1, n)))
    return groups


def _count_ngrams(tokens: jax.Array, grams: np.ndarray, max_skip: int) -> jax.Array:
    """How often each n-gram in ``grams`` [P, n] occurs in each row of ``tokens`` [B, C],
    over all skips 0..max_skip (a 1-gram counts once)."""
    n = grams.shape[1]
    length = tokens.shape[1]
    total = jnp.zeros((tokens.shape[0], grams.shape[0]), jnp.int64)
    for skip in range(max_skip + 1 if n > 1 else 1):
        stride = skip + 1
        span = (n - 1) * stride + 1
        if span > length:
            break
        starts = np.arange(length - span + 1)
        windows = tokens[:, starts[:, None] + stride * np.arange(n)]          # [B, W, n]
        hit = jnp.all(windows[:, :, None, :] == jnp.asarray(grams)[None, None], axis=-1)  # [B, W, P]
        total = total + jnp.sum(hit, axis=1, dtype=jnp.int64)
    return total


@op("TfIdfVectorizer", 9)
def tfidf_vectorizer(x, *, max_gram_length: int, max_skip_count: int, min_gram_length: int, mode: str,
                     ngram_counts: tuple[int, ...], ngram_indexes: tuple[int, ...],
                     pool_int64s: tuple[int, ...] | None = None, pool_strings: tuple[str, ...] | None = None,
                     weights: tuple[float, ...] | None = None):
    """https://onnx.ai/onnx/operators/onnx__TfIdfVectorizer.html

    Integer inputs count in JAX (they may be runtime values); string inputs are
    mapped to pool ids on the host first. ``weights`` are per pool n-gram (as the spec and
    onnxruntime read them; onnx's reference evaluator indexes them by output coordinate).
    """
    mode = _text(mode)
    if mode not in ("TF", "IDF", "TFIDF"):
        raise ValueError(f"TfIdfVectorizer mode must be TF, IDF or TFIDF, got '{mode}'")
    if (pool_int64s is None) == (pool_strings is None):
        raise ValueError("TfIdfVectorizer wants exactly one of pool_int64s and pool_strings")
    if not 1 <= min_gram_length <= max_gram_length:
        raise ValueError(f"TfIdfVectorizer wants 1 <= min_gram_length <= max_gram_length, "
                         f"got {min_gram_length} and {max_gram_length}")
    if pool_strings is not None:
        vocab: dict[str, int] = {}
        pool = np.asarray([vocab.setdefault(_text(s), len(vocab)) for s in pool_strings], np.int64)
        strings = _strings(x, "TfIdfVectorizer")
        tokens: Any = np.asarray(_map(lambda s: vocab.get(s, -1), strings, np.int64))
    else:
        pool = np.asarray(pool_int64s, np.int64)
        tokens = jnp.asarray(x)
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"TfIdfVectorizer with pool_int64s wants an integer input, got {tokens.dtype}")
    rank = np.ndim(tokens)
    if rank > 2:
        raise ValueError(f"TfIdfVectorizer takes a [C] or [N, C] input, got rank {rank}")
    rows = jnp.asarray(tokens).astype(jnp.int64).reshape((-1, 1) if rank == 0 else ((1, -1) if rank == 1 else tokens.shape))

    indexes = np.asarray(ngram_indexes, np.int64)
    size = int(indexes.max(initial=-1)) + 1
    counts = jnp.zeros((rows.shape[0], size), jnp.int64)
    first = 0
    for n, grams in _pool_ngrams(pool, ngram_counts):
        where = indexes[first:first + len(grams)]
        first += len(grams)
        if min_gram_length <= n <= max_gram_length and len(grams):
            counts = counts.at[:, where].add(_count_ngrams(rows, grams, int(max_skip_count)))
    if first != len(indexes):
        raise ValueError(f"TfIdfVectorizer: the pool holds {first} n-grams but ngram_indexes has {len(indexes)} entries")

    y = counts.astype(jnp.float32)
    if mode == "IDF":
        y = jnp.minimum(y, 1.0)
    if mode != "TF" and weights:
        if len(weights) != len(indexes):
            raise ValueError(f"TfIdfVectorizer: {len(weights)} weights for {len(indexes)} n-grams; want one per n-gram")
        scale = np.zeros(size, np.float32)
        scale[indexes] = np.asarray(weights, np.float32)
        y = y * jnp.asarray(scale)
    return y.reshape(size) if rank < 2 else y
