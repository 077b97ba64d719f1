"""Kernel tests run the Triton kernels through Triton's interpreter on the CPU.

TRITON_INTERPRET must be set before any `@triton.jit` function is defined, i.e. before the
kernel modules are imported; test modules in this folder are imported after this file.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
