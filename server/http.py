"""HTTP plumbing shared by every route: errors in TGI's (or OpenAI's) shape,
the API key, and reading a JSON body strictly.

Routes parse the body themselves (``read_body``) rather than through
FastAPI's body parameters, so that every bad body gets TGI's error shape:
415 unless it is declared JSON (a browser's cross-origin ``text/plain`` POST
needs no preflight, so any web page could otherwise make a keyless local
server compute), 413 before an oversized body is read, 422 for invalid
UTF-8, non-JSON, nesting too deep, NaN/Infinity and wrong types.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from . import protocol
from .settings import Settings

log = logging.getLogger("treespec.server")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
RETRY_AFTER = {"Retry-After": "1"}  # every 429: full now, likely free within a second or so


class ApiError(Exception):
    """An error response in TGI's shape. ``counted`` is False for errors the
    scheduler has already counted (a request that failed or was cancelled
    while generating)."""

    def __init__(self, status: int, error: str, error_type: str, headers: dict | None = None,
                 counted: bool = True):
        super().__init__(error)
        self.status, self.error, self.error_type, self.headers = status, error, error_type, headers
        self.counted = counted


def error_response(status: int, error: str, error_type: str, headers: dict | None = None,
                   path: str = "") -> JSONResponse:
    """TGI's error shape, or on OpenAI's routes (/v1/...) OpenAI's, which its SDK reads the message from."""
    return JSONResponse(error_body(error, error_type, status, path), status_code=status, headers=headers)


def error_body(error: str, error_type: str, status: int | None, path: str) -> dict:
    if path.startswith("/v1/"):
        return {"error": {"message": error, "type": error_type, "param": None, "code": status}}
    return {"error": error, "error_type": error_type}


def sse_error(error: str, error_type: str, sep: str = "", path: str = "") -> str:
    """An error as the last event of a stream that has already begun."""
    return f"data:{sep}" + json.dumps(error_body(error, error_type, None, path)) + "\n\n"


def settings_of(request: Request) -> Settings:
    return request.app.state.settings


def check_auth(request: Request) -> None:
    key = settings_of(request).api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "Missing or invalid API key: send Authorization: Bearer <key>", "unauthorized",
                       {"WWW-Authenticate": "Bearer"})


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _check_strings(value: Any, where: str = "body") -> None:
    """JSON may escape lone surrogates (\\ud800), which no UTF-8 can encode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(422, f"Input validation error: {where} is not valid UTF-8 "
                                f"(it contains a lone surrogate escape)", "validation") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_strings(v, f"{where}.{k}" if where != "body" else str(k))
    elif isinstance(value, list):
        for v in value:
            _check_strings(v, where)


async def read_body(request: Request, model: type[BaseModel]) -> Any:
    """The request's JSON body as ``model``, after the API key check."""
    check_auth(request)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json" and not (ctype.startswith("application/") and ctype.endswith("+json")):
        raise ApiError(415, f"Content-Type must be application/json, got {ctype or 'none'}", "unsupported_media_type")
    limit = settings_of(request).max_body_bytes
    too_large = ApiError(413, f"Request body is larger than {limit} bytes", "payload_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large  # refuse before reading a byte of it
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
    except ClientDisconnect:
        # The client's doing, not ours: one line, no traceback, nobody to answer.
        log.info("client left %s while sending its request body (%d bytes read)", request.url.path, len(body))
        raise ApiError(499, "Client closed the connection while sending the request", "disconnected") from None
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(422, f"Input validation error: request body is not valid UTF-8 "
                            f"(byte {body[e.start]:#04x} at offset {e.start})", "validation") from None
    try:
        data = json.loads(text, parse_constant=_no_constants)
    except RecursionError:
        raise ApiError(422, "Input validation error: request body is nested too deeply", "validation") from None
    except ValueError as e:
        raise ApiError(422, f"Input validation error: request body is not valid JSON ({e})", "validation") from None
    try:
        _check_strings(data)
        return model.model_validate(data)
    except RecursionError:
        raise ApiError(422, "Input validation error: request body is nested too deeply", "validation") from None
    except ValidationError as e:
        raise ApiError(422, protocol.validation_message(e), "validation") from None


async def disconnected(request: Request) -> None:
    """Returns once the client has gone away (for routes that answer at the end)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
