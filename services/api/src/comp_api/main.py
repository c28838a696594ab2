"""Composition root: settings -> logging -> tracing -> broker and Redis -> the app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from faststream.nats import NatsBroker
from opentelemetry.sdk.trace import TracerProvider

from comp_common.broker import make_broker
from comp_common.kv import ConflictError
from comp_common.logs import configure_logging
from comp_common.observed import ObservedStore, connect
from comp_common.telemetry import setup_tracing

from .backends import Backends, DependencyUnavailable
from .control_routes import router as control_router
from .rollout_routes import router as rollout_router
from .routes import manifest_schemas, router
from .service_routes import router as service_router
from .capacity_routes import router as capacity_router
from .audit_routes import router as audit_router
from .catalog_routes import router as catalog_router
from .event_routes import router as event_router
from .trace_routes import router as trace_router
from .settings import ApiSettings
from .tracing import RequestTracingMiddleware
from .audit_middleware import AuditMiddleware
from .http_metrics import RequestMetricsMiddleware, router as metrics_router

log = logging.getLogger("api")


def create_app(
    settings: ApiSettings,
    broker: NatsBroker,
    observed: ObservedStore,
    tracer_provider: TracerProvider | None = None,
) -> FastAPI:
    """The api over an unstarted broker and a Redis store; its lifespan owns both from here on."""
    backends = Backends(settings, broker, observed)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # In the background, so that the api answers (503) while NATS is still unreachable.
        connecting = asyncio.create_task(backends.connect(), name="api-connect-nats")
        connecting.add_done_callback(_log_connect_failure)
        try:
            yield
        finally:
            connecting.cancel()
            # wait() rather than await: a failure is already logged, shutdown goes on.
            await asyncio.wait([connecting])
            await backends.close()

    app = FastAPI(
        title="COMP API",
        version="1",
        description=(
            "Apply, inspect and delete deployments and services, roll deployments back and forward; "
            "inspect tasks and nodes."
        ),
        lifespan=lifespan,
    )
    app.state.backends = backends
    app.include_router(router)
    app.include_router(control_router)
    app.include_router(rollout_router)
    app.include_router(service_router)
    app.include_router(capacity_router)
    app.include_router(event_router)
    app.include_router(audit_router)
    app.include_router(catalog_router)
    app.include_router(trace_router)
    app.include_router(metrics_router)
    app.add_middleware(RequestTracingMiddleware, tracer_provider=tracer_provider)
    app.add_middleware(RequestMetricsMiddleware)
    # Outermost: it sees the final status and the operation id the tracing middleware adds.
    app.add_middleware(AuditMiddleware, backends=backends, settings=settings.api)

    @app.exception_handler(DependencyUnavailable)
    async def dependency_unavailable(request: Request, exc: DependencyUnavailable) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503)

    @app.exception_handler(ConflictError)
    async def conflict(request: Request, exc: ConflictError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    _document_manifest_schemas(app)
    return app


def _log_connect_failure(task: asyncio.Task[None]) -> None:
    # Otherwise the api would stay unhealthy with nothing in its log to say why.
    if not task.cancelled() and task.exception() is not None:
        log.error("giving up connecting to NATS", exc_info=task.exception())


def _document_manifest_schemas(app: FastAPI) -> None:
    """Add the manifest models that the raw apply body refers to into the OpenAPI components."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(manifest_schemas())
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def run() -> None:
    settings = ApiSettings()
    configure_logging("api", settings.log)
    tracer_provider = setup_tracing("api", settings.telemetry, settings.nats.url)
    broker = make_broker(settings.nats, "api", tracer_provider)
    observed = ObservedStore(connect(settings.redis.url), settings.cluster)
    app = create_app(settings, broker, observed, tracer_provider)
    log.info("listening on %s:%d", settings.api.host, settings.api.port)
    try:
        # log_config=None keeps the JSON logging configured above for uvicorn's own loggers.
        # A bounded graceful shutdown: uvicorn otherwise waits for every open connection, and
        # an event follow (GET /v1/events?follow=true) stays open until its client leaves.
        uvicorn.run(app, host=settings.api.host, port=settings.api.port, log_config=None, timeout_graceful_shutdown=3)
    finally:
        tracer_provider.shutdown()


if __name__ == "__main__":
    run()
