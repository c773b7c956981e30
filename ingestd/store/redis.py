"""Redis: the one client a daemon (or a command) opens, shared by every stage that uses it.

The quota backend and the latest values share its connection pool; each stage decides for
itself what a failure means (quotas fall back to local limits, latest values wait).
"""

from __future__ import annotations

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ingestd.config import RedisSection

__all__ = ["connect"]


def connect(section: RedisSection) -> redis.asyncio.Redis:
    """A client for ``redis.url`` (connections are made on first use, not here)."""
    if section.url is None:
        raise ValueError("redis.url is not set")
    password = section.password.get_secret_value() if section.password else None
    return redis.asyncio.Redis.from_url(
        section.url,
        password=password,
        socket_timeout=section.timeout,
        socket_connect_timeout=section.timeout,
        # One immediate retry: after a Redis restart the first command on a pooled
        # connection fails on the dead socket; the retry reconnects.
        retry=Retry(NoBackoff(), 1),
    )
