"""The memcache port on the event loop's own transports (twin of erq/_fast/_epoll.pyx)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def listen(
    loop: asyncio.AbstractEventLoop,
    host: str,
    port: int,
    factory: Callable[[], asyncio.BaseProtocol],
    *,
    backlog: int = 1024,
) -> asyncio.Server:
    """Open the memcache port on ``host:port``; every client becomes ``factory()``."""
    return await loop.create_server(factory, host, port, reuse_address=True, backlog=backlog)
