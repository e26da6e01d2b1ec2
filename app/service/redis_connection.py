"""Connections to Redis or a Redis Cluster, shared by the client tracker and the fingerprint
store: short timeouts and no retries (a dead Redis must cost requests nothing), the errors a call
may raise, and the hash tag that keeps a client's keys in one cluster slot.
"""

from __future__ import annotations

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry

# What a Redis or Redis Cluster call may raise: RedisClusterException (no connectable node, keys
# in several slots) is not a RedisError.
REDIS_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, RedisClusterException)


RedisClient = redis.Redis | RedisCluster


def hash_tag(client_id: str) -> str:
    """The client's hash tag: its id with '%', '{' and '}' percent-escaped (one-to-one), so that
    the braces around it delimit the whole id; '%' for the empty id (an empty tag `{}` would
    make Redis Cluster hash each key whole, splitting a client's keys over slots)."""
    if not client_id:
        return "%"
    return client_id.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


def checked_prefix(prefix: str) -> str:
    """A key prefix, refused with braces: a hash tag in it would pull every client's keys into
    one cluster slot."""
    if "{" in prefix or "}" in prefix:
        raise ValueError(f"the key prefix must not contain braces (hash tags): {prefix!r}")
    return prefix


def connect(url: str, *, cluster: bool, timeout_s: float) -> RedisClient:
    """A client with short timeouts and no retries: a dead Redis must cost requests nothing.

    ``cluster``: a Redis Cluster client (``redis.cluster.RedisCluster``) bootstrapped from the
    node in ``url``; it discovers the others and routes each command to its slot's node. It
    connects when created, so the tracker creates it on first use, inside its error handling."""
    if cluster:
        return RedisCluster.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
        )
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        health_check_interval=0,
    )
