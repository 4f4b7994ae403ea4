"""Request dependencies, as named Annotated aliases (async: sync ones go through a thread pool).

A route takes one of them, never a chain: FastAPI solves each dependency with about as much work
as the rest of a submit's validation (measured: two chained dependencies were 11 % of a submit's
instructions, one is 5 %), so the caller and the resources come together in `CallerDep`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from api.keys import PUBLIC
from api.resources import Resources
from core.errors import Forbidden, Unauthorized
from core.tenants import Identity, Role


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
    """Who is asking (the identity their bearer key belongs to), and what to answer with."""

    res: Resources
    identity: Identity

    @property
    def tenant(self) -> str:
        """The caller's tenant."""
        return self.identity.tenant

    @property
    def admin(self) -> bool:
        """Whether the caller's key has the admin role."""
        return self.identity.role is Role.ADMIN


async def authenticate(resources: Resources, authorization: str) -> Identity | None:
    """The identity behind an Authorization header; None without a valid key."""
    if await resources.keys.is_open():
        return PUBLIC
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    return await resources.keys.identify(key.strip())


async def get_caller(request: Request) -> Caller:
    """The caller behind the bearer key; 401 without a valid one (unless the API is open)."""
    resources = resources_of(request)
    identity = await authenticate(resources, request.headers.get("authorization", ""))
    if identity is None:
        raise Unauthorized("send a valid key as 'Authorization: Bearer <key>'")
    return Caller(resources, identity)


CallerDep = Annotated[Caller, Depends(get_caller)]


async def get_admin(request: Request) -> Caller:
    """A caller whose key has the admin role; 403 for a user key."""
    caller = await get_caller(request)
    if not caller.admin:
        raise Forbidden("this needs an admin key")
    return caller


AdminDep = Annotated[Caller, Depends(get_admin)]
