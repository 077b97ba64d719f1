"""Serve the HTTP API with uvicorn inside the router's own event loop, beside the gRPC server.

One loop for both means one engine and no locks: an HTTP request calls `Engine.submit` exactly as a
gRPC one does. The router process owns the signals (it drains gRPC and HTTP together), so uvicorn is
kept from installing its own handlers.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn

log = logging.getLogger("nextserve.router")


class _EmbeddedServer(uvicorn.Server):
    def capture_signals(self):
        return contextlib.nullcontext()


class HttpServer:
    """A started uvicorn server on `port`; `await stop()` closes it."""

    def __init__(self, server: uvicorn.Server, task: asyncio.Task, port: int):
        self._server, self._task, self.port = server, task, port
        self.served = None  # the ServedModel behind the app, when serve_openai started it

    async def stop(self, grace: float = 1.0) -> None:
        # No grace: do not wait for open keep-alive connections (force_exit), and give uvicorn's own wait a
        # moment to see that rather than time out on the spot.
        self._server.force_exit = grace <= 0
        self._server.config.timeout_graceful_shutdown = grace if grace > 0 else 1.0
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def start_http(app, host: str, port: int, startup_timeout: float = 30.0) -> HttpServer:
    """Bind host:port (0: any free port) and serve `app` until stopped. Raises OSError if it cannot listen."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} for HTTP: {e}") from e
    sock.listen(1024)
    sock.setblocking(False)
    bound = sock.getsockname()[1]
    # lifespan off: the router starts and stops the engine itself; access logs would log every request.
    config = uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False, timeout_graceful_shutdown=1)
    server = _EmbeddedServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="http")
    deadline = asyncio.get_running_loop().time() + startup_timeout
    while not server.started:
        if task.done():
            task.result()  # raises what failed the startup
            raise OSError(f"the HTTP server on {host}:{bound} stopped during startup")
        if asyncio.get_running_loop().time() > deadline:
            server.should_exit = True
            raise OSError(f"the HTTP server on {host}:{bound} did not start in {startup_timeout} s")
        await asyncio.sleep(0.01)
    log.info("HTTP API (OpenAI-compatible) on %s:%d", host, bound)
    return HttpServer(server, task, bound)


async def serve_openai(engine, config, tokenizer, checkpoint: str, host: str, port: int, model_name: str | None,
                       sessions, drain=None) -> HttpServer:
    """The OpenAI-compatible API of this router's engine on host:port; the model is named after the
    checkpoint directory unless `model_name` is given. `sessions`: where /v1/responses keeps its
    responses (SessionStores.responses, router/session_stores.py)."""
    import time
    from pathlib import Path

    from nextserve.model.chat_template import generation_stop_ids, load_chat_template

    from .openai_api import ServedModel
    from .openai_app import build_app

    eos = () if engine.eos_token_id is None else (engine.eos_token_id,)
    served = ServedModel(
        name=model_name or Path(checkpoint).resolve().name, engine=engine, config=config, tokenizer=tokenizer,
        chat_template=load_chat_template(checkpoint) if tokenizer is not None else None,
        chat_stop_ids=tuple(dict.fromkeys(generation_stop_ids(checkpoint) or eos)),
        sessions=sessions, created=int(time.time()), drain=drain)
    server = await start_http(build_app(served), host, port)
    server.served = served
    return server
