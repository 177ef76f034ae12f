"""Who may post webhooks: WAHA's HMAC-SHA512 of the raw body and the shared X-Webhook-Token, both in constant time."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence


def compute_waha_hmac(body: bytes, key: str) -> str:
    """WAHA's X-Webhook-Hmac: lowercase hex HMAC-SHA512 of the raw body."""
    return hmac.new(key.encode("utf-8"), body, hashlib.sha512).hexdigest()


def hmac_keys(configured: str | Sequence[str]) -> list[str]:
    """WEBHOOK_HMAC_KEY may hold several keys separated by commas, so WAHA's key can be rotated without
    refusing the webhooks signed with the old one (README: rotating the key)."""
    keys = configured.split(",") if isinstance(configured, str) else list(configured)
    return [key.strip() for key in keys if key.strip()]


def verify_waha_hmac(
    body: bytes, signature: str | None, key: str | Sequence[str], *, algorithm: str | None = None
) -> bool:
    """True when `signature` is WAHA's HMAC of exactly these bytes under any of the keys (constant time)."""
    if not signature or (algorithm is not None and algorithm.lower() != "sha512"):
        return False
    try:
        provided = signature.strip().lower().encode("ascii")
    except UnicodeEncodeError:  # compare_digest refuses non-ASCII str; such a header is simply wrong
        return False
    # Every key is tried (no early exit), so the time taken does not tell which one matched.
    matches = [hmac.compare_digest(compute_waha_hmac(body, one).encode("ascii"), provided) for one in hmac_keys(key)]
    return any(matches)


def verify_token(provided: str | None, expected: str) -> bool:
    """Constant-time comparison of the shared X-Webhook-Token."""
    return provided is not None and hmac.compare_digest(provided.encode("utf-8"), expected.encode("utf-8"))
