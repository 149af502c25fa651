"""The live console of a running build, relayed from its launcher.

The launcher that runs a build stores the address of its console server
(launcher/console.py) with its claim of the build in ZooKeeper; this router
connects there and passes the stream on to the browser as server-sent
events, one event per line of job-output.txt, then an `end` event when the
build is over. A build that is not running has no console: its page says
where its logs are once it reports.
"""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Iterator

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from fastapi.templating import Jinja2Templates

from zuul_lite.state import ZuulState

log = logging.getLogger("zuul_lite.web.console")

UUID = re.compile(r"[0-9a-f]{32}")
CONNECT_TIMEOUT = 5.0
# A comment event this often keeps proxies from closing a quiet stream and
# tells us when the browser has gone (the write fails).
KEEPALIVE = 20.0


def make_router(state: ZuulState, templates: Jinja2Templates) -> APIRouter:
    router = APIRouter()

    def console_of(uuid: str) -> tuple[str, int]:
        if not UUID.fullmatch(uuid):
            raise HTTPException(404, f"There is no build {uuid[:64]}.")
        address = state.build_console(uuid)
        if address is None:
            raise HTTPException(
                404, f"Build {uuid} is not running: its logs are linked from its report."
            )
        host, _, port = address.rpartition(":")
        return host.strip("[]"), int(port)

    @router.get("/api/console/{uuid}")
    def api_console(uuid: str) -> Response:
        """text/event-stream: `data:` per output line, then `event: end`."""
        host, port = console_of(uuid)
        try:
            conn = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
            conn.sendall(uuid.encode() + b"\n")
        except OSError as error:
            log.warning("Console of %s at %s:%s: %s", uuid, host, port, error)
            raise HTTPException(
                503, f"The launcher running build {uuid} does not answer at {host}:{port}."
            ) from None
        conn.settimeout(KEEPALIVE)
        return StreamingResponse(
            _events(conn),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @router.get("/console/{uuid}", response_class=HTMLResponse, include_in_schema=False)
    def console_page(request: Request, uuid: str) -> Response:
        console_of(uuid)
        return templates.TemplateResponse(request, "console.html", {"uuid": uuid})

    return router


def _events(conn: socket.socket) -> Iterator[bytes]:
    """The launcher's bytes as SSE events; runs in Starlette's thread pool."""
    pending = b""
    try:
        while True:
            try:
                data = conn.recv(65536)
            except TimeoutError:
                yield b": keepalive\n\n"
                continue
            if not data:
                break
            lines = (pending + data).split(b"\n")
            pending = lines.pop()
            yield b"".join(b"data: " + line.replace(b"\r", b"") + b"\n\n" for line in lines)
        if pending:
            yield b"data: " + pending.replace(b"\r", b"") + b"\n\n"
        yield b"event: end\ndata: \n\n"
    except OSError as error:
        log.debug("Console stream ended: %s", error)
    finally:
        conn.close()
