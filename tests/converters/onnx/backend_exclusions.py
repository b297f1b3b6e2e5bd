"""Backend-suite cases jaxinfer does not run, each with the reason (regex -> why).

An excluded case counts as not passed in the conformance figures.
"""

from __future__ import annotations

EXCLUDED: dict[str, str] = {
    r"^test_image_decoder_": (
        "ImageDecoder decodes JPEG/PNG/BMP/TIFF/WebP byte streams: codec work XLA cannot express, "
        "and no image codec library is a dependency"),
    r"^test_bernoulli": (
        "the spec leaves the generator unspecified; expected values are numpy's MT19937 draws, which "
        "jax.random (threefry) cannot reproduce"),
    r"^test_dft_inverse": (
        "expected values carry float32 FFT rounding noise (~2e-7) at exactly-zero bins, below the "
        "suite's atol of 1e-7; we compute in complex128 and return exact zeros"),
    r"^test_if_opt_cpu": (
        "If with a run-time condition whose branches return an empty vs a non-empty optional: one jitted "
        "value needs one static structure (lax.cond branches must match)"),
    r"^test_loop16_seq_none_cpu": (
        "onnx's runner cannot compare a sequence holding a 0-d tensor (TypeError: len() of unsized object "
        "in assert_similar_outputs); our output matches the reference element for element"),
    r"^test_training_dropout(_default)?(_mask)?_cpu$": (
        "training-mode Dropout with ratio > 0: the expected mask comes from numpy's np.random stream, which "
        "jax.random cannot reproduce; we draw a reproducible mask keyed by `seed` (tested separately)"),
    r"^test_squeezenet_cpu$": (
        "the light SqueezeNet's stand-in constant weights make all 1000 logits equal in exact arithmetic "
        "at ~6.8e9; XLA CPU's own convolution (the default since convolutions left YNNPACK, 1.2x faster "
        "on the light CNNs) rounds its output-channel tiles differently, 5 ulps (2560) apart, and softmax "
        "turns that into a near one-hot instead of the expected uniform 0.001; with the library "
        "convolution (dot+conv) the logits tie and the case passes"),
    r"^test_gradient_of_add(_and_mul)?_cpu$": (
        "Gradient (ai.onnx.preview.training) differentiates the enclosing graph named by its xs/y "
        "attributes; an op cannot see its graph (it needs a graph pass into a differentiable subgraph)"),
}
