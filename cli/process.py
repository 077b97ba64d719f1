"""What every long-running `nextserve` process shares: picking its device and waiting for a stop signal."""
from __future__ import annotations

import asyncio
import signal


def default_device() -> str:
    """"cuda" when a GPU is visible, else "cpu"."""
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


async def until_signalled() -> None:
    """Wait for SIGINT or SIGTERM (Kubernetes stops pods with SIGTERM)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
