"""One SERVER span per HTTP request, continuing the caller's trace when it sends one.

The span is current while the route runs, so whatever the route publishes on NATS
carries the same trace (FastStream's telemetry middleware injects it into the
headers).  The trace id goes back to the client as ``x-comp-operation-id``: the
handle by which one operation is found in every service's spans and logs.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

OPERATION_ID_HEADER = "x-comp-operation-id"

_PROPAGATOR = TraceContextTextMapPropagator()


class RequestTracingMiddleware:
    def __init__(self, app: ASGIApp, tracer_provider: TracerProvider | None = None):
        self.app = app
        self._tracer = trace.get_tracer("comp_api", tracer_provider=tracer_provider)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        outer = trace.get_current_span()
        if outer.get_span_context().is_valid:
            # FastAPI's own telemetry already made the SERVER span (continuing any
            # traceparent): a second one would split the request into two traces.
            await self._serve(scope, receive, send, outer, owned=False)
            return
        headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}
        method = scope["method"]
        with self._tracer.start_as_current_span(
            # Renamed to "METHOD /route/{template}" once routing has matched.
            method,
            context=_PROPAGATOR.extract(headers),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": scope["path"]},
        ) as span:
            await self._serve(scope, receive, send, span, owned=True)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, span: trace.Span, owned: bool) -> None:
        operation_id = trace.format_trace_id(span.get_span_context().trace_id)
        status_code = 500

        async def send_with_operation_id(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (OPERATION_ID_HEADER.encode(), operation_id.encode())],
                }
            await send(message)

        try:
            await self.app(scope, receive, send_with_operation_id)
        finally:
            if owned:
                # The router records the matched route in the scope it was given.
                route_template = getattr(scope.get("route"), "path", None)
                if route_template:
                    span.update_name(f"{scope['method']} {route_template}")
                    span.set_attribute("http.route", route_template)
                span.set_attribute("http.response.status_code", status_code)
                if status_code >= 500:
                    span.set_status(Status(StatusCode.ERROR))
