"""Request dependencies, as named Annotated aliases (async: sync ones go through a thread pool)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.resources import Resources, hash_key
from core.errors import Unauthorized

PUBLIC_TENANT = "public"


async def get_resources(request: Request) -> Resources:
    """The gateway's resources, built in the lifespan (tests override this)."""
    resources: Resources = request.app.state.resources
    return resources


ResourcesDep = Annotated[Resources, Depends(get_resources)]


async def get_tenant(request: Request, resources: ResourcesDep) -> str:
    """The tenant the bearer key belongs to."""
    if resources.open:
        return PUBLIC_TENANT
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    tenant = resources.tenants.get(hash_key(key.strip())) if scheme.lower() == "bearer" else None
    if tenant is None:
        raise Unauthorized("send a valid key as 'Authorization: Bearer <key>'")
    return tenant


TenantDep = Annotated[str, Depends(get_tenant)]
