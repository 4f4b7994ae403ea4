"""Request dependencies, as named Annotated aliases (async: sync ones go through a thread pool).

A route takes one of them, never a chain: FastAPI solves each dependency with about as much work
as the rest of a submit's validation (measured: two chained dependencies were 11 % of a submit's
instructions, one is 5 %), so the caller and the resources come together in `CallerDep`.

The caller is authenticated before the body is read, by `api.middleware.Gate`, which leaves it in
the request's scope (`scope["state"]["caller"]`); `get_caller` only picks it up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from api.keys import PUBLIC
from api.resources import Resources
from core.errors import Forbidden, Unauthorized
from core.tenants import Identity, Role

CALLER = "caller"  # the key of the authenticated caller in the ASGI scope's "state"


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


async def authenticate(resources: Resources, authorization: str | None) -> Caller | None:
    """The caller an `Authorization` header names, or None when it names no one.

    The one place a key is checked: the gateway's middleware calls it before reading a body.
    """
    if await resources.keys.is_open():
        return Caller(resources, PUBLIC)
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    identity = await resources.keys.identify(key.strip())
    return None if identity is None else Caller(resources, identity)


async def get_caller(request: Request) -> Caller:
    """The caller the middleware authenticated; 401 without a valid key (unless the API is open)."""
    caller: Caller | None = request.scope.get("state", {}).get(CALLER)
    if caller is None:  # a route the middleware does not guard (none today): check here
        caller = await authenticate(resources_of(request), request.headers.get("authorization"))
    if caller is None:
        raise Unauthorized("send a valid key as 'Authorization: Bearer <key>'")
    return caller


CallerDep = Annotated[Caller, Depends(get_caller)]


async def get_admin(request: Request) -> Caller:
    """A caller whose key has the admin role; 403 for a user key."""
    caller = await get_caller(request)
    if not caller.admin:
        raise Forbidden("this needs an admin key")
    return caller


AdminDep = Annotated[Caller, Depends(get_admin)]
