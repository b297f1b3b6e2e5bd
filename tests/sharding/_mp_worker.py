"""One process of the 2-process x 4-CPU-device test (started by test_multiprocess.py).

argv: process_id port out_dir. Writes out_dir/<process_id>.npz with the
outputs of each sharded config.
"""

from __future__ import annotations

import os
import sys

os.environ.pop("XLA_FLAGS", None)  # this process simulates 4 devices, not the test runner's 8

import numpy as np  # noqa: E402

from jaxinfer.sharding import distributed  # noqa: E402


def main() -> None:
    pid, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid, local_devices=4)
    import jax

    import jaxinfer
    from jaxinfer.sharding import shard

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "fixtures", "sharding"))
    import models

    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    m = jaxinfer.load(models.gpt2_like(layers=2, d=128, heads=8, vocab=512, seq=8))
    feeds = dict(np.load(os.path.join(out_dir, "feeds.npz")))
    results = {}
    for name, cfg in (("tp2_dp4", {"tensor": 2, "data": 4}), ("tp8", {"tensor": 8})):
        sm = shard(m, {**cfg, "replicate_outputs": True})
        results[name] = sm.run(feeds)["logits"]
    np.savez(os.path.join(out_dir, f"{pid}.npz"), **results)
    distributed.shutdown()


if __name__ == "__main__":
    main()
