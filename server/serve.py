"""Run the HTTP server on a bundle: uvicorn around ``build_app(settings)``, with the
scheduler's own grace period on shutdown (the command is ``treespec serve``,
treespec/cli/serve.py).
"""

from __future__ import annotations

import logging

from .settings import Settings


def serve(settings: Settings):
    """Serve ``settings.bundle`` under uvicorn until the server is stopped
    (SIGINT or SIGTERM, or a bundle that fails to load); the scheduler, whose
    ``state`` is "failed" (``load_error`` says why) if the bundle never loaded.
    It logs through the ``treespec`` loggers; configuring them is the caller's."""
    import uvicorn

    from .app import build_app

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            # uvicorn waits for open connections and, past its timeout, cancels
            # their tasks mid-response. Starting the scheduler's own grace period
            # first lets in-flight requests finish, and ends the stragglers with
            # a "cancelled" event/503 that the client can read.
            app.state.scheduler.begin_shutdown(settings.graceful_timeout_s)
            await super().shutdown(sockets)

    server: uvicorn.Server | None = None

    def stop_after_failed_load() -> None:
        if server is not None:
            server.should_exit = True

    def announce() -> None:
        port = settings.port
        if server is not None and server.servers and server.servers[0].sockets:
            port = server.servers[0].sockets[0].getsockname()[1]
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
        url = f"http://{host}:{port}"
        scheduler = app.state.scheduler
        key = " -H 'Authorization: Bearer $TREESPEC_API_KEY'" if settings.api_key else ""
        logging.getLogger("treespec.server").info(
            "treespec is ready at %s (model %s, %s weights, drafter %s). Try:\n  curl -s %s/generate%s "
            "-H 'Content-Type: application/json' -d '{\"inputs\": \"def fib(n):\", \"parameters\": "
            "{\"max_new_tokens\": 32}}'\n  API docs: %s/docs", url, scheduler.model_name, scheduler.kernels.precision,
            scheduler.default_drafter, url, key, url)

    app = build_app(settings, on_load_failed=stop_after_failed_load, on_ready=announce)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            # a backstop only: the scheduler cancels stragglers first (Server.shutdown)
                            timeout_graceful_shutdown=settings.graceful_timeout_s + 10, lifespan="on",
                            access_log=settings.log_level == "debug")
    server = Server(config)
    server.run()
    return app.state.scheduler


def port_in_use(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (e.g. "Address already in use"), or None."""
    import socket

    if port == 0:
        return None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind((host, port))
        except OSError as e:
            return e.strerror or str(e)
    return None
