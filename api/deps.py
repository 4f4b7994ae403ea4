"""Request dependencies, as named Annotated aliases (async: sync ones go through a thread pool).

A route takes one of them, never a chain: FastAPI solves each dependency with about as much work
as the rest of a submit's validation (measured: two chained dependencies were 11 % of a submit's
instructions, one is 5 %), so the caller and the resources come together in `CallerDep`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from api.resources import Resources, hash_key
from core.errors import Unauthorized

PUBLIC_TENANT = "public"


def resources_of(request: Request) -> Resources:
    """The gateway's resources, built in the lifespan."""
    resources: Resources = request.app.state.resources
    return resources


async def get_resources(request: Request) -> Resources:
    """The resources, for routes that serve anyone (tests may override this)."""
    return resources_of(request)


ResourcesDep = Annotated[Resources, Depends(get_resources)]


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking (the tenant their bearer key belongs to), and what to answer with."""

    res: Resources
    tenant: str


async def get_caller(request: Request) -> Caller:
    """The tenant behind the bearer key; 401 without a valid one (unless the API is open)."""
    resources = resources_of(request)
    if resources.open:
        return Caller(resources, PUBLIC_TENANT)
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    tenant = resources.tenants.get(hash_key(key.strip())) if scheme.lower() == "bearer" else None
    if tenant is None:
        raise Unauthorized("send a valid key as 'Authorization: Bearer <key>'")
    return Caller(resources, tenant)


CallerDep = Annotated[Caller, Depends(get_caller)]
