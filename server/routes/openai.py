"""OpenAI's API: ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .. import protocol
from ..http import SSE_HEADERS, ApiError, check_auth, disconnected, read_body
from . import serving

router = APIRouter()


@router.post("/v1/completions")
async def completions(request: Request):
    req = await read_body(request, protocol.CompletionRequest)
    s = serving(request)
    jobs = await s.completions(req, request.state)
    if req.stream:
        return StreamingResponse(s.completion_stream(req, jobs), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    return JSONResponse((await s.completion_response(req, jobs, disconnected(request))).model_dump())


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    req = await read_body(request, protocol.ChatCompletionRequest)
    s = serving(request)
    jobs = await s.chat(req, request.state)
    if req.stream:
        return StreamingResponse(s.chat_stream(req, jobs), media_type="text/event-stream", headers=SSE_HEADERS)
    return JSONResponse((await s.chat_response(req, jobs, disconnected(request))).model_dump())


@router.get("/v1/models")
async def list_models(request: Request):
    check_auth(request)
    return protocol.ModelList(data=[serving(request).model_card()]).model_dump()


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request):
    check_auth(request)
    card = serving(request).model_card()
    if model_id != card.id:
        raise ApiError(404, f"The model {model_id!r} does not exist: this server serves {card.id!r}", "not_found")
    return card.model_dump()
