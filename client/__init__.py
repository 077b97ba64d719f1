"""Clients for a nextserve router: `Client` (blocking) and `AsyncClient` (asyncio)."""
from .aio import AsyncClient
from .messages import Chunk, Completion, ServingError
from .sync import Client

__all__ = ["AsyncClient", "Chunk", "Client", "Completion", "ServingError"]
