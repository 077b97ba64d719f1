"""Causal depthwise conv1d in front of the Gated DeltaNet.

`causal_conv1d` / `causal_conv1d_update` here are the Triton kernels; `naive` holds the plain
torch references of the same two functions (the CPU path, and the tests' oracle).
"""
from .triton_conv import causal_conv1d, causal_conv1d_update

__all__ = ["causal_conv1d", "causal_conv1d_update"]
