"""Signatures: the published test vectors (docs/PROTOCOL.md), cross-checks against the official
SDK, and the properties of the constant-time comparison. Pure functions; no server."""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import quote

import pusher
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastrelay import _core
from fastrelay.signatures import (
    api_string_to_sign,
    channel_auth_message,
    check_api_request,
    check_channel_auth,
    check_user_auth,
    sign_api_request,
    sign_channel,
)

KEY = "278d425bdf160c739803"
SECRET = "7ad3773142a6692b25b8"
SOCKET = "1234.1234"
PRIVATE_SIG = "58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
USER_DATA = '{"id":"12345"}'
USER_SIG = "4708d583dada6a56435fb8bc611c77c359a31eebde13337c16ab43aa6de336ba"
API_BODY = b'{"name":"foo","channels":["project-3"],"data":"{\\"some\\":\\"data\\"}"}'
API_TS = 1353088179
API_MD5 = "ec365a775a4cd0599faeb73354201b6f"
API_SIG = "da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"

SDK = pusher.Pusher(app_id="3", key=KEY, secret=SECRET)


# ---------------------------------------------------------------- vectors


def test_private_channel_vector():
    assert sign_channel(KEY, SECRET, SOCKET, "private-foobar") == f"{KEY}:{PRIVATE_SIG}"
    assert channel_auth_message(SOCKET, "private-foobar") == b"1234.1234:private-foobar"
    assert check_channel_auth(KEY, SECRET.encode(), f"{KEY}:{PRIVATE_SIG}", SOCKET, "private-foobar")
    assert check_channel_auth(KEY, SECRET.encode(), f"{KEY}:{PRIVATE_SIG.upper()}", SOCKET, "private-foobar")
    assert _core.verify_hmac(SECRET.encode(), b"1234.1234:private-foobar", PRIVATE_SIG)
    assert _core.verify_hmac(SECRET.encode(), b"1234.1234:private-foobar", PRIVATE_SIG.encode())
    assert _core.hmac_sha256_hex(SECRET.encode(), b"1234.1234:private-foobar") == PRIVATE_SIG


def test_private_channel_rejections():
    s = SECRET.encode()
    assert not check_channel_auth(KEY, s, f"{KEY}:{PRIVATE_SIG}", "1234.1235", "private-foobar")
    assert not check_channel_auth(KEY, s, f"{KEY}:{PRIVATE_SIG}", SOCKET, "private-foobaz")
    assert not check_channel_auth(KEY, s, f"other:{PRIVATE_SIG}", SOCKET, "private-foobar")
    assert not check_channel_auth(KEY, s, PRIVATE_SIG, SOCKET, "private-foobar")  # no key
    assert not check_channel_auth(KEY, s, f"{KEY}:{PRIVATE_SIG[:-1]}", SOCKET, "private-foobar")
    assert not check_channel_auth(KEY, s, f"{KEY}:{PRIVATE_SIG}0", SOCKET, "private-foobar")
    assert not check_channel_auth(KEY, s, f"{KEY}:", SOCKET, "private-foobar")
    assert not check_channel_auth(KEY, s, f"{KEY}:é{PRIVATE_SIG[1:]}", SOCKET, "private-foobar")
    for bad in (None, 5, b"x", ["a"], {"auth": 1}):
        assert not check_channel_auth(KEY, s, bad, SOCKET, "private-foobar")
    # a private signature does not authorize presence (the message includes channel_data)
    assert not check_channel_auth(KEY, s, f"{KEY}:{PRIVATE_SIG}", SOCKET, "private-foobar", "{}")


def test_presence_matches_sdk():
    member = {"user_id": 10, "user_info": {"name": "Mr. Channels"}}
    a = SDK.authenticate("presence-foobar", SOCKET, member)
    cd = a["channel_data"]
    assert sign_channel(KEY, SECRET, SOCKET, "presence-foobar", cd) == a["auth"]
    assert check_channel_auth(KEY, SECRET.encode(), a["auth"], SOCKET, "presence-foobar", cd)
    # the exact string is signed: re-serialized JSON with other spacing does not verify
    other = cd.replace(": ", ":") if ": " in cd else cd.replace(":", ": ")
    assert not check_channel_auth(KEY, SECRET.encode(), a["auth"], SOCKET, "presence-foobar", other)


def test_private_matches_sdk():
    assert SDK.authenticate("private-foobar", SOCKET) == {"auth": f"{KEY}:{PRIVATE_SIG}"}


def test_user_signin_vector():
    assert check_user_auth(KEY, SECRET.encode(), f"{KEY}:{USER_SIG}", SOCKET, USER_DATA)
    assert _core.verify_hmac(SECRET.encode(), f"{SOCKET}::user::{USER_DATA}".encode(), USER_SIG)
    assert not check_user_auth(KEY, SECRET.encode(), f"{KEY}:{USER_SIG}", SOCKET, '{"id":"12346"}')
    assert not check_user_auth(KEY, SECRET.encode(), f"{KEY}:{USER_SIG}", "1.1", USER_DATA)
    assert not check_user_auth(KEY, SECRET.encode(), f"x:{USER_SIG}", SOCKET, USER_DATA)
    assert not check_user_auth(KEY, SECRET.encode(), None, SOCKET, USER_DATA)
    # the SDK agrees
    a = SDK.authenticate_user(SOCKET, {"id": "12345"})
    assert check_user_auth(KEY, SECRET.encode(), a["auth"], SOCKET, a["user_data"])


def test_api_vector():
    assert hashlib.md5(API_BODY).hexdigest() == API_MD5
    q = sign_api_request(KEY, SECRET, "POST", "/apps/3/events", API_BODY, timestamp=API_TS)
    assert q == {"auth_key": KEY, "auth_timestamp": str(API_TS), "auth_version": "1.0",
                 "body_md5": API_MD5, "auth_signature": API_SIG}
    assert api_string_to_sign("POST", "/apps/3/events", q) == (
        "POST\n/apps/3/events\n"
        f"auth_key={KEY}&auth_timestamp={API_TS}&auth_version=1.0&body_md5={API_MD5}")
    query = "&".join(f"{k}={v}" for k, v in q.items())
    assert check_api_request(KEY, SECRET.encode(), "POST", "/apps/3/events", query, API_BODY,
                             now=API_TS + 10) is None


def test_api_checks():
    path = "/apps/3/events"
    s = SECRET.encode()
    good = sign_api_request(KEY, SECRET, "POST", path, API_BODY, timestamp=API_TS)

    def check(q, body=API_BODY, now=API_TS, method="POST", p=path):
        return check_api_request(KEY, s, method, p, "&".join(f"{k}={v}" for k, v in q.items()), body,
                                 now=now)

    assert check(good) is None
    assert check(good, now=API_TS + 600) is None
    assert check(good, now=API_TS - 600) is None
    assert "auth_timestamp" in check(good, now=API_TS + 601)
    assert "auth_timestamp" in check(good, now=API_TS - 601)
    assert "body_md5" in check(good, body=API_BODY + b" ")
    assert "body_md5" in check({k: v for k, v in good.items() if k != "body_md5"})
    assert check(dict(good, auth_signature="0" * 64)) is not None
    assert check(dict(good, auth_signature=API_SIG.upper())) is None
    assert check(good, method="GET") is not None
    assert check(good, p="/apps/4/events") is not None
    assert check(dict(good, auth_key="other")) is not None
    assert check({k: v for k, v in good.items() if k != "auth_signature"}) is not None
    assert check(dict(good, auth_timestamp="%C2%B2")) is not None  # a non-ASCII digit: no crash
    assert check(dict(good, auth_timestamp="-1")) is not None
    assert check(dict(good, extra="1")) is not None  # an unsigned extra parameter
    # keys are signed lower-cased, sorted
    q = sign_api_request(KEY, SECRET, "GET", "/apps/3/channels", params={"info": "user_count",
                         "filter_by_prefix": "presence-"}, timestamp=API_TS)
    assert api_string_to_sign("GET", "/apps/3/channels", q).split("\n")[2].startswith(
        "auth_key=")
    assert check(q, body=b"", method="GET", p="/apps/3/channels") is None


_PARAM = st.text(alphabet="abcAB_-.x0é", min_size=1, max_size=6)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(_PARAM, _PARAM, max_size=20), st.sampled_from(["GET", "POST"]))
def test_api_signature_any_parameters(extra, method):
    """Keys signed lower-cased and sorted (then by value; keys differing only in case are
    both signed), with escapes and non-ASCII: a request signed the documented way passes,
    and a changed value fails."""
    path = "/apps/3/channels"
    q = {k: v for k, v in extra.items() if not k.lower().startswith("auth_")}
    q = sign_api_request(KEY, SECRET, method, path, params=q, timestamp=API_TS)
    query = "&".join(f"{quote(k)}={quote(v)}" for k, v in q.items())
    assert check_api_request(KEY, SECRET.encode(), method, path, query, b"", now=API_TS) is None
    if extra:
        k = next(k for k in q if k not in ("auth_signature",))
        bad = "&".join(f"{quote(a)}={quote(v + 'z' if a == k else v)}" for a, v in q.items())
        problem = check_api_request(KEY, SECRET.encode(), method, path, bad, b"", now=API_TS)
        assert problem is not None


_RAW = st.text(alphabet="abcAB_-.x0", min_size=1, max_size=5)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(_RAW, _RAW), max_size=18), st.sampled_from(["GET", "POST"]),
       st.booleans())
def test_api_signature_raw_query_agrees(pairs, method, tamper):
    """A query without escapes is checked straight from the string; it must agree with the
    general path (forced by escaping auth_version's dot) on every query: repeated keys (the
    last one counts), keys differing in case, too many parameters, a changed value."""
    path = "/apps/3/channels"
    body = b'{"a":1}' if method == "POST" else b""
    extra = [(k, v) for k, v in pairs if not k.lower().startswith("auth_") and k.lower() != "body_md5"]
    signed = sign_api_request(KEY, SECRET, method, path, body, params=dict(extra), timestamp=API_TS)
    items = extra + [(k, v) for k, v in signed.items() if k.startswith("auth_") or k == "body_md5"]
    if tamper:  # the occurrence that counts: the last one of the first key
        i = max(i for i, (k, _) in enumerate(items) if k == items[0][0])
        items[i] = (items[i][0], items[i][1] + "z")
    query = "&".join(f"{k}={v}" for k, v in items)
    fast = check_api_request(KEY, SECRET.encode(), method, path, query, body, now=API_TS)
    general = check_api_request(KEY, SECRET.encode(), method, path,
                                query.replace("auth_version=1.0", "auth_version=1%2E0"), body,
                                now=API_TS)
    assert (fast is None) == (general is None)
    assert (fast is None) == (not tamper)


def test_api_signature_matches_sdk():
    """The SDK signs what it sends; rebuild its request and check it the server's way."""
    from pusher.signature import sign as sdk_sign
    ts = int(time.time())
    q = {"auth_key": KEY, "auth_timestamp": str(ts), "auth_version": "1.0",
         "filter_by_prefix": "presence-", "info": "user_count"}
    string = "GET\n/apps/3/channels\n" + "&".join(f"{k}={q[k]}" for k in sorted(q))
    q["auth_signature"] = sdk_sign(SECRET, string)
    query = "&".join(f"{k}={v}" for k, v in q.items()).replace(",", "%2C")
    assert check_api_request(KEY, SECRET.encode(), "GET", "/apps/3/channels", query, b"") is None


def test_verify_md5():
    verify_md5 = _core.verify_md5
    assert verify_md5(API_BODY, API_MD5)
    assert verify_md5(API_BODY, API_MD5.upper())
    assert not verify_md5(API_BODY, API_MD5[:-1])
    assert not verify_md5(API_BODY, "")
    assert not verify_md5(API_BODY, "é" * 32)


# ---------------------------------------------------------------- constant_time_equal


def test_constant_time_equal_basics():
    cte = _core.constant_time_equal
    assert cte(b"", b"")
    assert cte(b"abc", b"abc")
    assert not cte(b"abc", b"abd")
    assert not cte(b"abc", b"ab")
    assert not cte(b"", b"a")
    assert not cte(b"\x00", b"")
    assert cte(b"\x00" * 64, b"\x00" * 64)
    assert not cte(b"\x00" * 64, b"\x00" * 63 + b"\x80")
    with pytest.raises(TypeError):
        cte("abc", b"abc")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=80), st.binary(max_size=80))
def test_constant_time_equal_matches_eq(a, b):
    assert _core.constant_time_equal(a, b) == (a == b) == hmac.compare_digest(a, b)
    assert _core.constant_time_equal(a, a)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.integers(0, 63), st.integers(1, 255))
def test_constant_time_equal_any_single_bit_flip(a, pos, flip):
    b = bytearray(a)
    b[pos % len(a)] ^= flip
    assert not _core.constant_time_equal(a, bytes(b))


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=64), st.binary(max_size=200),
       st.one_of(st.text(max_size=70), st.binary(max_size=70), st.none(), st.integers()))
def test_verify_hmac_never_raises(key, msg, sig):
    expected = hmac.new(key, msg, hashlib.sha256).hexdigest()
    assert _core.verify_hmac(key, msg, expected)
    assert _core.verify_hmac(key, msg, expected.upper())
    assert _core.verify_hmac(key, msg, sig) == (isinstance(sig, (str, bytes)) and (
        (sig.lower() if isinstance(sig, str) else sig.lower().decode("latin-1")) == expected))
