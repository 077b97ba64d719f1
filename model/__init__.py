"""The Qwen3-Next model, its checkpoints and its sampling, in plain torch over `nextserve.kernels.ops`."""
from .config import Qwen3NextConfig
from .generate import Completion, generate, generate_stream
from .qwen3_next import Qwen3NextForCausalLM
from .sampling import Sampler, SamplingParams
from .state import CachePools, ForwardBatch, StaticCache

__all__ = [
    "CachePools",
    "Completion",
    "ForwardBatch",
    "Qwen3NextConfig",
    "Qwen3NextForCausalLM",
    "Sampler",
    "SamplingParams",
    "StaticCache",
    "generate",
    "generate_stream",
]
