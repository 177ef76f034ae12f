"""Webhook sender checks: WAHA's HMAC (published test vector) and the shared token header."""

import pytest

from whatsapp_webhook.signature import compute_waha_hmac, verify_token, verify_waha_hmac

# From WAHA's docs ("HMAC authentication"), reproduced with Python's hmac module.
WAHA_VECTOR_BODY = b'{"event":"message","session":"default","engine":"WEBJS"}'
WAHA_VECTOR_KEY = "my-secret-key"
WAHA_VECTOR_HMAC = ("208f8a55dde9e05519e898b10b89bf0d0b3b0fdf11fdbf09b6b90476301b98d8"
                    "097c462b2b17a6ce93b6b47a136cf2e78a33a63f6752c2c1631777076153fa89")


def test_hmac_matches_wahas_published_vector() -> None:
    assert compute_waha_hmac(WAHA_VECTOR_BODY, WAHA_VECTOR_KEY) == WAHA_VECTOR_HMAC
    assert verify_waha_hmac(WAHA_VECTOR_BODY, WAHA_VECTOR_HMAC, WAHA_VECTOR_KEY, algorithm="sha512")


@pytest.mark.parametrize("signature, body, key, algorithm", [
    (None, WAHA_VECTOR_BODY, WAHA_VECTOR_KEY, "sha512"),                      # header missing
    ("", WAHA_VECTOR_BODY, WAHA_VECTOR_KEY, "sha512"),                        # header empty
    (WAHA_VECTOR_HMAC, WAHA_VECTOR_BODY + b" ", WAHA_VECTOR_KEY, "sha512"),    # one byte added
    (WAHA_VECTOR_HMAC, WAHA_VECTOR_BODY.replace(b"WEBJS", b"NOWEB"), WAHA_VECTOR_KEY, None),  # body changed
    (WAHA_VECTOR_HMAC, WAHA_VECTOR_BODY, "other-key", None),                  # wrong key
    (WAHA_VECTOR_HMAC[:-1] + "0", WAHA_VECTOR_BODY, WAHA_VECTOR_KEY, None),   # signature changed
    (WAHA_VECTOR_HMAC, WAHA_VECTOR_BODY, WAHA_VECTOR_KEY, "sha256"),          # algorithm we do not speak
])
def test_hmac_rejects_anything_but_the_exact_signed_bytes(signature, body, key, algorithm) -> None:
    assert not verify_waha_hmac(body, signature, key, algorithm=algorithm)


def test_hmac_accepts_uppercase_hex_and_missing_algorithm_header() -> None:
    assert verify_waha_hmac(WAHA_VECTOR_BODY, WAHA_VECTOR_HMAC.upper(), WAHA_VECTOR_KEY)


def test_token_comparison() -> None:
    assert verify_token("s3cret", "s3cret")
    assert not verify_token(None, "s3cret")
    assert not verify_token("s3cre", "s3cret")
    assert not verify_token("S3CRET", "s3cret")


def test_several_keys_let_the_key_be_rotated_without_refusing_either() -> None:
    old_key, new_key = "old-key-1f2e", "new-key-9a8b"
    during_rotation = f"{new_key}, {old_key}"
    for key in (old_key, new_key):
        signature = compute_waha_hmac(WAHA_VECTOR_BODY, key)
        assert verify_waha_hmac(WAHA_VECTOR_BODY, signature, during_rotation, algorithm="sha512")
        assert verify_waha_hmac(WAHA_VECTOR_BODY, signature, [new_key, old_key])
    assert not verify_waha_hmac(WAHA_VECTOR_BODY, compute_waha_hmac(WAHA_VECTOR_BODY, "other"), during_rotation)
    assert not verify_waha_hmac(WAHA_VECTOR_BODY, compute_waha_hmac(WAHA_VECTOR_BODY, old_key), new_key)
    assert not verify_waha_hmac(WAHA_VECTOR_BODY, "", ",, ")  # no key at all never verifies
