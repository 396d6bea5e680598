"""atheris (libFuzzer) harness for the compiled core's byte parsers, with no socket.

Feeds fuzzer bytes into `Conn.data_received` (HTTP/1.1 request parsing, then, when the input
starts with an upgrade, WebSocket framing) through tests/fuzz/harness.py, and into the pure
helpers (`parse_query`, `unquote`). Any exception escaping data_received is a finding: in the
server it would abort the connection without an answer (uvloop logs "Fatal error").

Run (see README.md):
    python tests/fuzz/fuzz_core.py -max_total_time=600 -max_len=4096 tests/fuzz/corpus
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import atheris  # noqa: E402

with atheris.instrument_imports():
    from harness import Harness  # noqa: E402

    from fastrelay import _core  # noqa: E402  (compiled: coverage comes from Python glue only)

UPGRADE = (b"GET /app/k?protocol=7 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 3)
    if mode == 3:
        s = fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes())
        _core.unquote(s)
        _core.parse_query(s)
        return
    split = fdp.ConsumeIntInRange(1, 64)
    rest = fdp.ConsumeBytes(fdp.remaining_bytes())
    h = Harness(max_header=1024, max_body=1024, max_frame=2048)
    try:
        chunks = [UPGRADE] if mode == 1 else []
        if mode == 2:  # one chunk: the fast path of data_received
            chunks.append(rest)
        else:
            chunks += [rest[i:i + split] for i in range(0, len(rest), split)]
        h.feed_all(chunks)
    finally:
        h.close()


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
