"""Services: read (joined with the endpoints discovery wrote), delete, and their lb counters.
They are applied with deployments, by ``POST /v1/apply`` in routes.py."""

from __future__ import annotations

import json
import time
from typing import Annotated

import nats.errors
from fastapi import APIRouter, Depends, HTTPException, Path
from nats.aio.msg import Msg
from pydantic import TypeAdapter, ValidationError

from comp_common import subjects
from comp_common.broker import trace_headers
from comp_common.manifest import DNS_LABEL
from comp_common.messages import EndpointCounter, ServiceEvent
from comp_common.telemetry import current_trace_id

from .backends import NATS, Backends
from .routes import _UNAVAILABLE, _announce_service, get_backends, log
from .schemas import DeleteResponse, ErrorResponse, ServiceView
from .service_store import StoredService

router = APIRouter()
BackendsDep = Annotated[Backends, Depends(get_backends)]
NamePath = Annotated[str, Path(pattern=DNS_LABEL, max_length=63)]

_SERVICE = "/v1/namespaces/{namespace}/services/{name}"
_NOT_FOUND = {404: {"model": ErrorResponse, "description": "no such service"}}
_COUNTER_LIST = TypeAdapter(list[EndpointCounter])
# What the server sends to a reply subject when nobody is subscribed to the request's subject.
_NO_RESPONDERS = "503"


@router.get("/v1/services", response_model=list[ServiceView], responses=_UNAVAILABLE)
async def list_services(backends: BackendsDep, namespace: str | None = None) -> list[ServiceView]:
    store = backends.services()
    async with backends.calling(NATS):
        stored = await store.list(namespace)
        discovered = await store.endpoints(stored)
    return [ServiceView.of(s, discovered.get(s.service.key)) for s in stored]


@router.get(_SERVICE, response_model=ServiceView, responses={**_NOT_FOUND, **_UNAVAILABLE})
async def get_service(namespace: NamePath, name: NamePath, backends: BackendsDep) -> ServiceView:
    stored = await _stored(backends, namespace, name)
    async with backends.calling(NATS):
        discovered = await backends.services().endpoints([stored])
    return ServiceView.of(stored, discovered.get(stored.service.key))


@router.delete(_SERVICE, response_model=DeleteResponse, responses={**_NOT_FOUND, **_UNAVAILABLE})
async def delete_service(namespace: NamePath, name: NamePath, backends: BackendsDep) -> DeleteResponse:
    store = backends.services()
    async with backends.calling(NATS):
        deleted = await store.delete(namespace, name)
    if deleted is None:
        raise _not_found(namespace, name)
    # The revision the service had when it was deleted.
    await _announce_service(backends, ServiceEvent(action="deleted", namespace=namespace, name=name, revision=deleted.revision))
    return DeleteResponse(operation_id=current_trace_id() or "", namespace=namespace, name=name)


@router.get(f"{_SERVICE}/counters", response_model=list[EndpointCounter], responses={**_NOT_FOUND, **_UNAVAILABLE})
async def service_counters(namespace: NamePath, name: NamePath, backends: BackendsDep) -> list[EndpointCounter]:
    """What every host's lb has counted for the service, one entry per host, port and target
    (``target`` "" for the service port as a whole); an empty list when no lb answers."""
    await _stored(backends, namespace, name)
    counters: list[EndpointCounter] = []
    # The subject names the service already, but trace_headers() marks the body as JSON and a
    # FastStream responder would fail to decode an empty one.
    request = json.dumps({"namespace": namespace, "name": name}).encode()
    for reply in await _gather_replies(backends, subjects.lb_counters(namespace, name), request):
        try:
            counters += _COUNTER_LIST.validate_json(reply.data)
        except ValidationError as exc:
            # One lb of another version or a broken one must not hide what the others counted.
            log.warning("ignored a counters reply for %s/%s that is not a list of counters: %s", namespace, name, str(exc)[:300])
    return counters


async def _gather_replies(backends: Backends, subject: str, request: bytes) -> list[Msg]:
    """Every reply to a request on ``subject`` within the counters window.

    Not ``request()``, which returns the first reply: every host's lb answers, and how many
    hosts there are is not known here, so replies are collected until the window closes.
    """
    window = backends.settings.api.counters_window_seconds
    connection = backends.broker.connection
    replies: list[Msg] = []
    async with backends.calling(NATS):
        inbox = connection.new_inbox()
        subscription = await connection.subscribe(inbox)
        try:
            await connection.publish(subject, request, reply=inbox, headers=trace_headers())
            deadline = time.monotonic() + window
            while (remaining := deadline - time.monotonic()) > 0:
                try:
                    reply = await subscription.next_msg(timeout=remaining)
                except nats.errors.TimeoutError:
                    break
                if reply.headers and reply.headers.get("Status") == _NO_RESPONDERS:
                    break  # no lb is subscribed: nobody else will answer either
                replies.append(reply)
        finally:
            await subscription.unsubscribe()
    return replies


async def _stored(backends: Backends, namespace: str, name: str) -> StoredService:
    store = backends.services()
    async with backends.calling(NATS):
        stored = await store.get(namespace, name)
    if stored is None:
        raise _not_found(namespace, name)
    return stored


def _not_found(namespace: str, name: str) -> HTTPException:
    return HTTPException(404, f"service {name!r} not found in namespace {namespace!r}")
