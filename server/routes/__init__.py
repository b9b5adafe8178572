"""One router per API. Each route parses its body and calls one method of
the serving layer (``request.app.state.serving``); a new endpoint is a
route here and a method there."""

from fastapi import Request

from ..serving import Serving


def serving(request: Request) -> Serving:
    return request.app.state.serving
