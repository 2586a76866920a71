"""redis-py types each command of its asyncio client as `Awaitable[T] | T` (one set of command
methods serves the blocking and the asyncio clients), which cannot be awaited as typed. `asyncio_reply()`
says which of the two the asyncio client returns: a cast, so nothing is wrapped or awaited twice."""

from collections.abc import Awaitable
from typing import TypeVar, cast

T = TypeVar("T")


def asyncio_reply(response: Awaitable[T] | T) -> Awaitable[T]:
    return cast("Awaitable[T]", response)
