"""Pusher signatures: channel authorization, user sign-in and signed HTTP API requests.

The HMAC, the body's MD5 and the constant-time comparisons are in the compiled core.
"""

from __future__ import annotations

import hashlib
import time

from ._core import (
    api_string_to_sign,
    check_api_request,
    hmac_sha256_hex,
    verify_hmac,
)

# check_api_request(app_key, secret, method, path, query, body, now=0) -> the 401's message
# or None: the HTTP API's signature check, in the core (it runs on every trigger)
__all__ = ["api_string_to_sign", "ascii_int", "channel_auth_message", "check_api_request",
           "check_channel_auth", "check_user_auth", "sign_api_request", "sign_channel",
           "verify_hmac"]


def channel_auth_message(socket_id: str, channel: str, channel_data: str | None = None) -> bytes:
    if channel_data is None:
        return f"{socket_id}:{channel}".encode()
    return f"{socket_id}:{channel}:{channel_data}".encode()


def sign_channel(key: str, secret: str, socket_id: str, channel: str,
                 channel_data: str | None = None) -> str:
    """The `auth` string a client sends: "key:hex"; used by the CLI and the tests' helpers."""
    return f"{key}:{hmac_sha256_hex(secret.encode(), channel_auth_message(socket_id, channel, channel_data))}"


def ascii_int(s: str) -> int | None:
    """s as an integer when it is ASCII digits, else None ('²'.isdigit(), but int('²') raises).
    Timestamps and version numbers from clients are read with this."""
    return int(s) if s.isascii() and s.isdigit() else None


def _check_auth(key: str, secret: bytes, auth: object, message: bytes) -> bool:
    """A client's "key:hex" auth string for this app's key and message."""
    if not isinstance(auth, str):
        return False
    auth_key, sep, signature = auth.partition(":")
    return bool(sep) and auth_key == key and verify_hmac(secret, message, signature)


def check_channel_auth(key: str, secret: bytes, auth: object, socket_id: str, channel: str,
                       channel_data: str | None = None) -> bool:
    return _check_auth(key, secret, auth, channel_auth_message(socket_id, channel, channel_data))


def check_user_auth(key: str, secret: bytes, auth: object, socket_id: str, user_data: str) -> bool:
    return _check_auth(key, secret, auth, f"{socket_id}::user::{user_data}".encode())


def sign_api_request(key: str, secret: str, method: str, path: str, body: bytes = b"",
                     params: dict[str, str] | None = None, timestamp: int | None = None) -> dict[str, str]:
    """The query parameters of a signed HTTP API request (the CLI uses this; bench/common.py
    has its own copy, as it signs requests to any Pusher-compatible server)."""
    out = dict(params or {})
    out.update(auth_key=key, auth_timestamp=str(int(time.time()) if timestamp is None else timestamp),
               auth_version="1.0")
    if body:
        out["body_md5"] = hashlib.md5(body).hexdigest()
    out["auth_signature"] = hmac_sha256_hex(secret.encode(), api_string_to_sign(method, path, out).encode())
    return out
