"""Share-link secrets: made here, stored only as hashes, shown once."""

from __future__ import annotations

import hashlib
import secrets

LINK_ID_LEN = 10
_ID_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"  # no 0/o/1/l: ids are read aloud and retyped


def new_link_token() -> str:
    """A share-link token (24 random bytes, base64url) that never starts with '-' or '_': people paste it as a
    command argument (`share remove-link <vm> <token>`), where a leading '-' would read as an option."""
    while True:
        token = secrets.token_urlsafe(24)
        if token[0].isalnum():
            return token


def new_link_id() -> str:
    """The short public id of a link (`share show` lists it, `share remove-link` takes it)."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(LINK_ID_LEN))


def link_token_hash(token: str) -> str:
    """What the DB keeps of a link token (a purpose prefix, so no other secret's hash can match it)."""
    return hashlib.sha256(f"share-link:{token}".encode()).hexdigest()
