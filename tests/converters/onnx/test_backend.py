"""The ONNX backend conformance suite (onnx 1.23's node, simple, pytorch and light cases) on CPU.

Every excluded case is listed in ``backend_exclusions.py`` with its reason.
"""

from __future__ import annotations

import onnx.backend.test

import jaxinfer.converters.onnx.backend as backend

from .backend_exclusions import EXCLUDED

_suite = onnx.backend.test.BackendTest(backend, __name__)
for _pattern in EXCLUDED:
    _suite.exclude(_pattern)
_suite.exclude(r"_cuda$")

globals().update(_suite.test_cases)
