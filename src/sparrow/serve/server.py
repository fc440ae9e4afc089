"""Running the application: `sparrow serve`, and a background server for tests."""

from __future__ import annotations

import threading
import time

import uvicorn
from fastapi import FastAPI

from sparrow.errors import ConfigError


class BackgroundServer:
    """`with BackgroundServer(app) as server:` serves `app` on 127.0.0.1 at a free port
    (`server.url`) in a daemon thread, and stops it on exit."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="sparrow-server", daemon=True)
        self.url = ""

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError("the test server did not start")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def serve(app: FastAPI, host: str, port: int) -> None:
    """Serve until interrupted (SIGINT / SIGTERM shut down gracefully)."""
    uvicorn.run(app, host=host, port=port, log_level="info")
