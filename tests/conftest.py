"""Shared test setup: simulated CPU devices, and a per-kind conformance summary."""

from __future__ import annotations

import os
from collections import Counter

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# A developer's persistent cache would let programs stored by one test skip tracing in another, and the
# tests count traces: the suite runs without it (tests/test_aot.py turns it on in its own processes).
for _var in ("JAXINFER_CACHE_DIR", "JAX_COMPILATION_CACHE_DIR"):
    os.environ.pop(_var, None)

import jaxinfer  # noqa: E402,F401  (applies jaxinfer's JAX config first)

_KINDS = {
    "OnnxBackendNodeModelTest": "node",
    "OnnxBackendSimpleModelTest": "simple",
    "OnnxBackendPyTorchConvertedModelTest": "pytorch-converted",
    "OnnxBackendPyTorchOperatorModelTest": "pytorch-operator",
    "OnnxBackendRealModelTest": "light",
}


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ARG001
    passed: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for status in ("passed", "failed", "skipped", "error", "xfailed", "xpassed"):
        for rep in terminalreporter.stats.get(status, []):
            nodeid = getattr(rep, "nodeid", "")
            if "test_backend.py" not in nodeid or getattr(rep, "when", "call") not in ("call", "setup"):
                continue
            if rep.when == "setup" and status == "passed":
                continue
            kind = next((k for cls, k in _KINDS.items() if f"::{cls}::" in nodeid), None)
            if kind is None or not nodeid.endswith("_cpu"):
                continue
            total[kind] += 1
            passed[kind] += status == "passed"
    if not total:
        return
    terminalreporter.section("ONNX backend conformance (CPU cases)")
    for kind in ("node", "simple", "pytorch-converted", "pytorch-operator", "light"):
        terminalreporter.write_line(f"  {kind:18s} {passed[kind]:5d} / {total[kind]}")
    terminalreporter.write_line(f"  {'total':18s} {sum(passed.values()):5d} / {sum(total.values())}")


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_program: asserts what the XLA CPU program holds (our int8 kernel's "
                                       "custom call, XLA CPU's own behaviour); skipped where JAX's default "
                                       "backend is not the CPU")


def pytest_collection_modifyitems(config, items):  # noqa: ARG001
    import jax

    backend = jax.default_backend()
    if backend == "cpu":
        return
    skip = pytest.mark.skip(reason=f"asserts the XLA CPU program; JAX's default backend here is {backend}")
    for item in items:
        if item.get_closest_marker("cpu_program"):
            item.add_marker(skip)
