"""The ledger's Lua scripts, read from core/lua and put together once per process.

Each script is `ledger.lua` (the shared functions: places, counters, dispatch) followed by its own
body, and takes one JSON argument with named fields, so a script reads like a function call.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

SCRIPTS = ("submit", "transition", "position", "dispatch")  # each with ledger.lua


@cache
def source(name: str) -> str:
    """The full text of one ledger script."""
    if name not in SCRIPTS:
        raise KeyError(f"no ledger script {name!r}")
    folder = resources.files("core") / "lua"
    shared = (folder / "ledger.lua").read_text()
    return shared + "\n" + (folder / f"{name}.lua").read_text()


@cache
def plain(name: str) -> str:
    """A script that stands alone (no ledger functions)."""
    return (resources.files("core") / "lua" / f"{name}.lua").read_text()
