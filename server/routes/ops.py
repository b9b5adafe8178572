"""Operations: ``/health``, ``/info``, ``/metrics``, and vLLM's
``/detokenize`` and ``/tokenizer_info``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from .. import protocol
from ..http import check_auth, error_response, read_body
from ..metrics import CONTENT_TYPE
from . import serving

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    s = serving(request).scheduler
    if s.ready:
        return {"status": "ok"}
    if s.state == "failed":
        return error_response(503, f"Model failed to load: {s.load_error}", "unavailable")
    return error_response(503, "Model is loading" if s.state == "loading" else "Server is shutting down",
                          "unavailable")


@router.get("/info")
async def info(request: Request):
    s = serving(request)
    if s.scheduler.bundle is None:
        return error_response(503, "Model is loading", "unavailable")
    return s.info()


@router.get("/metrics")
async def prometheus(request: Request):
    return Response(serving(request).metrics.exposition(), media_type=CONTENT_TYPE)


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request):
    check_auth(request)
    return serving(request).tokenizer_info()


@router.post("/detokenize")
async def detokenize(request: Request):
    req = await read_body(request, protocol.DetokenizeRequest)
    return serving(request).detokenize(req)
