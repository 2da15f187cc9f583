"""Signed image URLs: `…/image.png?expires=T&sig=S`, S an HMAC-SHA256 over the job id and T with a
secret every gateway process of a deployment shares (`ARBITER_GATEWAY_URL_SECRET`, or else made once and kept
in Redis). A browser or an `<img>` opens the link without an API key until T; the link carries no key, and
changing the id or T breaks it."""

from __future__ import annotations

import hashlib
import hmac
import secrets

import redis

from broker.clock import server_now


class UrlSigner:
    def __init__(self, r: redis.Redis, secret_key: str, ttl_s: int, secret: str = "") -> None:
        """`secret`: the deployment's key (`ARBITER_GATEWAY_URL_SECRET`); empty, the one kept in Redis."""
        self.r, self.secret_key, self.ttl_s = r, secret_key, ttl_s
        self._secret: bytes | None = secret.encode() if secret else None

    def _key(self) -> bytes:
        if self._secret is None:   # the first gateway to ask makes it; the others read the same
            self.r.set(self.secret_key, secrets.token_hex(32), nx=True)
            self._secret = bytes.fromhex((self.r.get(self.secret_key) or b"").decode())
        return self._secret

    def sign(self, job_id: str, now: float | None = None) -> tuple[int, str]:
        expires = int((server_now(self.r) if now is None else now) + self.ttl_s)
        return expires, self._mac(job_id, expires)

    def _mac(self, job_id: str, expires: int) -> str:
        return hmac.new(self._key(), f"{job_id}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def check(self, job_id: str, expires: int, sig: str, now: float | None = None) -> str | None:
        """None if the signature is valid and unexpired, else why not."""
        if not hmac.compare_digest(self._mac(job_id, expires).encode(), sig.encode()):
            return "the link's signature does not match"
        if (server_now(self.r) if now is None else now) > expires:
            return "the link has expired; request the image again"
        return None
