"""KV-cache decoding of imported decoders: a fixed-shape cache, on-device sampling, a slot scheduler.

``Decoder`` compiles an exported decoder (HF/optimum past-KV layout, or GroupQueryAttention graphs) into a
prefill per prompt bucket and one decode step over a pre-allocated cache; ``Engine`` schedules requests
into its slots (continuous batching) and streams their tokens; ``generate`` / ``generate_stream`` wrap both.
"""

from .api import generate, generate_stream
from .decoder import Decoder
from .engine import Engine
from .layout import DecoderLayout
from .sampling import SamplingParams
from .stream import Stream

__all__ = ["Decoder", "DecoderLayout", "Engine", "SamplingParams", "Stream", "generate", "generate_stream"]
