"""Who may post webhooks: WAHA's HMAC-SHA512 of the raw body and the shared X-Webhook-Token, both in constant time."""

from __future__ import annotations

import hashlib
import hmac


def compute_waha_hmac(body: bytes, key: str) -> str:
    """WAHA's X-Webhook-Hmac: lowercase hex HMAC-SHA512 of the raw body."""
    return hmac.new(key.encode("utf-8"), body, hashlib.sha512).hexdigest()


def verify_waha_hmac(body: bytes, signature: str | None, key: str, *, algorithm: str | None = None) -> bool:
    """True when `signature` is WAHA's HMAC of exactly these bytes (compared in constant time)."""
    if not signature or (algorithm is not None and algorithm.lower() != "sha512"):
        return False
    try:
        provided = signature.strip().lower().encode("ascii")
    except UnicodeEncodeError:  # compare_digest refuses non-ASCII str; such a header is simply wrong
        return False
    return hmac.compare_digest(compute_waha_hmac(body, key).encode("ascii"), provided)


def verify_token(provided: str | None, expected: str) -> bool:
    """Constant-time comparison of the shared X-Webhook-Token."""
    return provided is not None and hmac.compare_digest(provided.encode("utf-8"), expected.encode("utf-8"))
