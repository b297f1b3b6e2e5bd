"""The reference decoding loop for the generation tests: onnxruntime on CPU, present KV fed back as past.

Issue 9's acceptance is "greedy tokens identical to this loop for 64 new tokens on every fixture", so it is
kept as plain as possible: batch 1, position_ids = arange, attention_mask all ones, one token per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnxruntime as ort

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32}


@lru_cache(maxsize=8)
def ort_session(path: str) -> ort.InferenceSession:
    """One single-threaded CPU session per file (cached: the tests and the loop reuse it)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def past_names(sess: ort.InferenceSession) -> list[str]:
    """The past KV input names in graph order (``past_key_values.{i}.key`` / ``.value``)."""
    return [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values.")]


def empty_past(sess: ort.InferenceSession, batch: int = 1) -> dict[str, np.ndarray]:
    """Zero-length past tensors [batch, kv_heads, 0, head_dim] with the dtype the graph declares."""
    out = {}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            heads, head_dim = i.shape[1], i.shape[3]
            out[i.name] = np.zeros((batch, heads, 0, head_dim), _ORT_TYPES[i.type])
    return out


def ort_step(sess: ort.InferenceSession, ids: np.ndarray, past: dict[str, np.ndarray]
             ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Run ``ids`` [batch, seq] after ``past``; returns logits [batch, seq, vocab] and the next past."""
    batch, seq = ids.shape
    past_len = next(iter(past.values())).shape[2] if past else 0
    feeds = {"input_ids": ids.astype(np.int64),
             "attention_mask": np.ones((batch, past_len + seq), np.int64),
             "position_ids": np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq)).copy(),
             **past}
    wanted = {i.name for i in sess.get_inputs()}
    outs = sess.run(None, {k: v for k, v in feeds.items() if k in wanted})
    names = [o.name for o in sess.get_outputs()]
    result = dict(zip(names, outs))
    nxt = {n.replace("present.", "past_key_values.", 1): v for n, v in result.items() if n.startswith("present.")}
    return result["logits"], nxt


def ort_greedy(path: str | Path, prompt_ids: Sequence[int], n_new: int) -> list[int]:
    """Greedy-decode ``n_new`` tokens after ``prompt_ids`` (batch 1): prefill the prompt, then one at a time."""
    if not prompt_ids:
        raise ValueError("ort_greedy needs a non-empty prompt")
    sess = ort_session(str(path))
    logits, past = ort_step(sess, np.asarray([list(prompt_ids)], np.int64), empty_past(sess))
    new: list[int] = []
    for _ in range(n_new):
        tok = int(np.argmax(logits[0, -1]))
        new.append(tok)
        if len(new) == n_new:
            break
        logits, past = ort_step(sess, np.asarray([[tok]], np.int64), past)
    return new
