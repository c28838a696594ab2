"""The event catalog: every subject COMP publishes as AsyncAPI 3.0, and each model's JSON Schema.

Built from :mod:`comp_common.catalog` in this process, so it needs neither NATS nor Redis
and answers while they are unreachable.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from fastapi import APIRouter, HTTPException

from comp_common import catalog

router = APIRouter(prefix="/v1/catalog", tags=["catalog"])


@cache
def _document() -> dict[str, Any]:
    # The models are fixed for the life of the process.
    return catalog.asyncapi_document()


@router.get("", summary="The event catalog as an AsyncAPI 3.0 document")
async def get_catalog() -> dict[str, Any]:
    """Every subject COMP publishes (events, control traffic, requests): its address with
    named tokens, its message, who publishes and who consumes it, whether the event
    stream keeps it; every message's JSON Schema under ``components.schemas``."""
    return _document()


@router.get(
    "/models/{name}",
    summary="One catalog model's JSON Schema",
    responses={404: {"description": "no such model; the answer lists the known ones"}},
)
async def get_model(name: str) -> dict[str, Any]:
    try:
        return catalog.model_schema(name)
    except KeyError:
        known = sorted(catalog.models())
        raise HTTPException(
            status_code=404,
            detail={"error": f"no model {name!r} in the event catalog", "known": known},
        ) from None
