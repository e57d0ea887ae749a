"""The small helpers every layer shares."""

from __future__ import annotations

import socket

from gradzip.util import first_line, format_bytes, free_port, last_line


def test_error_lines() -> None:
    assert first_line(ValueError("bad value\nmore detail")) == "bad value"
    assert first_line(RuntimeError()) == "RuntimeError"
    assert last_line("Traceback ...\n  File x\nKeyError: 'x'\n\n") == "KeyError: 'x'"
    assert last_line("  \n") == ""


def test_format_bytes_in_decimal_units() -> None:
    assert [format_bytes(n) for n in (None, 0, 999, 1000, 188_500, 75_600_000, 2.5e9)] == [
        "-", "0 B", "999 B", "1.0 kB", "188.5 kB", "75.6 MB", "2.5 GB",
    ]  # fmt: skip


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # raises if something held it
