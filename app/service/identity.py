"""Who is calling: API keys (constant-time), else ``X-Client-ID``, else the peer address.

``X-Forwarded-For`` is honoured only when the peer is a configured trusted proxy: the client is
then the right-most address in the header that is not itself a trusted proxy.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pydantic import SecretStr

MAX_CLIENT_ID_LENGTH = 128

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class IdentityError(Exception):
    """No valid credentials (401)."""


class InvalidClientIdError(Exception):
    """An ``X-Client-ID`` that is too long, not UTF-8, or holds control characters (400)."""


def header_text(value: str) -> str:
    """A header's value read as the UTF-8 text its bytes are. The server hands header values
    over decoded as latin-1 (HTTP's historical charset), which turned the id "héllo" into
    "hÃ©llo": stored under a name no admin lookup (/clients/h%C3%A9llo) could find."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise InvalidClientIdError("client id must be UTF-8 text") from None


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def secret_equal(a: bytes, b: bytes) -> bool:
    """Constant-time comparison (``hmac.compare_digest``); pass equal-length digests."""
    return hmac.compare_digest(a, b)


def token_matches(presented: str, expected: str) -> bool:
    """A presented secret against the configured one, in constant time, lengths hidden."""
    return secret_equal(_digest(presented), _digest(expected))


def _network(spec: str) -> Network:
    return ipaddress.ip_network(spec.strip(), strict=False)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


@dataclass(frozen=True)
class IdentityResolver:
    api_keys: tuple[tuple[str, bytes], ...]  # (client id, sha256 of the key)
    trusted_proxies: tuple[Network, ...]

    @classmethod
    def build(
        cls, api_keys: Mapping[str, SecretStr], trusted_proxies: Iterable[str]
    ) -> IdentityResolver:
        if any(not key.get_secret_value() for key in api_keys.values()):
            raise ValueError("API keys must not be empty")
        keys = tuple((cid, _digest(key.get_secret_value())) for cid, key in api_keys.items())
        return cls(keys, tuple(_network(spec) for spec in trusted_proxies))

    def client_for_key(self, presented: str | None) -> str:
        """Constant-time over every configured key: no early exit on a match, and digests of
        equal length are compared, so not even a key's length leaks."""
        candidate = _digest(presented or "")
        found: str | None = None
        for client_id, key in self.api_keys:
            if secret_equal(candidate, key) and presented:
                found = client_id
        if found is None:
            raise IdentityError("a valid API key is required")
        return found

    def _trusted(self, text: str) -> bool:
        address = _address(text)
        return address is not None and any(address in net for net in self.trusted_proxies)

    def peer_client(self, peer: str | None, forwarded_for: str | None) -> str:
        host = peer or "unknown"
        if forwarded_for and self._trusted(host):
            hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
            for hop in reversed(hops):
                if not self._trusted(hop):
                    return hop if _address(hop) is not None else host
            if hops:
                return hops[0]
        return host

    def resolve(
        self,
        *,
        api_key: str | None,
        client_id: str | None,
        peer: str | None,
        forwarded_for: str | None,
    ) -> str:
        if self.api_keys:
            return self.client_for_key(api_key)
        if client_id:
            client_id = header_text(client_id)
            if len(client_id) > MAX_CLIENT_ID_LENGTH or not client_id.isprintable():
                raise InvalidClientIdError(
                    f"client id must be 1-{MAX_CLIENT_ID_LENGTH} printable characters"
                )
            return client_id
        return self.peer_client(peer, forwarded_for)
