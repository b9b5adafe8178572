"""TGI's API: ``/``, ``/generate``, ``/generate_stream`` and ``/tokenize``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .. import protocol
from ..http import SSE_HEADERS, disconnected, read_body
from . import serving

router = APIRouter()


async def _start(request: Request):
    req = await read_body(request, protocol.GenerateRequest)
    return req, await serving(request).generate(req, request.state)


@router.post("/")
async def tgi_root(request: Request):
    """TGI's own route, which its clients (huggingface_hub's InferenceClient,
    text_generation.Client) call: a list of one response, or the stream."""
    req, job = await _start(request)
    s = serving(request)
    if req.stream:
        return StreamingResponse(s.generate_stream(req, job), media_type="text/event-stream", headers=SSE_HEADERS)
    body = await s.generate_response(req, job, disconnected(request))
    return JSONResponse([body.model_dump(exclude_none=False)])


@router.post("/generate", response_model=protocol.GenerateResponse)
async def generate(request: Request):
    req, job = await _start(request)
    body = await serving(request).generate_response(req, job, disconnected(request))
    return JSONResponse(body.model_dump(exclude_none=False))


@router.post("/generate_stream")
async def generate_stream(request: Request):
    req, job = await _start(request)
    return StreamingResponse(serving(request).generate_stream(req, job), media_type="text/event-stream",
                             headers=SSE_HEADERS)


@router.post("/tokenize")
async def tokenize(request: Request):
    """TGI's shape for ``inputs``; vLLM's for ``prompt`` or ``messages``."""
    req = await read_body(request, protocol.TokenizeRequest)
    return serving(request).tokenize(req)
