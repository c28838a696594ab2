"""The api's Prometheus metrics: every HTTP request counted and timed by its route
template (``/v1/deployments/{namespace}/{name}``, never the concrete path), and the
process registry served at ``GET /metrics`` on the api's own port."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request, Response
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from comp_common.metrics import LATENCY_BUCKETS, REGISTRY

# A path no route matched (a 404 or a probe); one label value for all of them.
UNMATCHED = "unmatched"
# Any other method a client sends is one label value too.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

REQUESTS = Counter(
    "comp_api_requests_total", "HTTP requests answered, by route template, method and status", ["route", "method", "status"]
)
REQUEST_SECONDS = Histogram(
    "comp_api_request_seconds", "From a request's arrival to its response's start, by route template and method",
    ["route", "method"], buckets=LATENCY_BUCKETS,
)
IN_PROGRESS = Gauge("comp_api_requests_in_progress", "HTTP requests being served")

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    # Prometheus asks for OpenMetrics first; a plain client gets the text format.
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encode(REGISTRY), headers={"content-type": content_type})


class RequestMetricsMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering
        answered_after: float | None = None

        async def send_noting_status(message: Message) -> None:
            nonlocal status, answered_after
            if message["type"] == "http.response.start":
                status = message["status"]
                answered_after = time.perf_counter() - began
            await send(message)

        IN_PROGRESS.inc()
        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            IN_PROGRESS.dec()
            # The router records the matched route in the scope it was given.
            route = getattr(scope.get("route"), "path", None) or UNMATCHED
            method = scope["method"] if scope["method"] in _METHODS else "other"
            REQUESTS.labels(route, method, str(status)).inc()
            REQUEST_SECONDS.labels(route, method).observe(
                answered_after if answered_after is not None else time.perf_counter() - began
            )
