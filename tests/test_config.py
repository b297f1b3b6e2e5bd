"""_config: the process-wide JAX settings importing jaxinfer applies."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_PROBE = ("import jaxinfer; from jax._src import xla_bridge as xb; "
          "print(xb._CPU_ENABLE_ASYNC_DISPATCH.value)")


def _probe(setting: str | None, code: str = _PROBE) -> str:
    """What ``code`` prints last, run with JAXINFER_CPU_ASYNC_DISPATCH set to ``setting`` (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "JAXINFER_CPU_ASYNC_DISPATCH"}
    if setting is not None:
        env["JAXINFER_CPU_ASYNC_DISPATCH"] = setting
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         check=True)
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("setting, async_dispatch", [(None, "False"), ("0", "False"), ("1", "True")])
def test_cpu_computations_run_inline_unless_asked_not_to(setting: str | None, async_dispatch: str):
    assert _probe(setting) == async_dispatch


def test_a_backend_started_before_import_is_left_alone():
    assert _probe(None, "import jax; jax.devices(); " + _PROBE) == "True"
