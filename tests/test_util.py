"""The small helpers every layer shares."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from gradzip.util import check_writable, first_line, format_bytes, free_port, last_line, write_atomic


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


def test_output_paths_are_checked_and_written_whole(tmp_path: Path) -> None:
    target = tmp_path / "new" / "out.json"
    check_writable(target, "--json")  # creates the folder, leaves nothing else
    assert target.parent.is_dir() and os.listdir(target.parent) == []
    with pytest.raises(ValueError, match=f"--json {tmp_path} is a directory"):
        check_writable(tmp_path, "--json")
    target.parent.chmod(0o500)
    try:
        if os.geteuid() != 0:  # root writes anywhere
            with pytest.raises(ValueError, match="cannot write --json"):
                check_writable(target, "--json")
    finally:
        target.parent.chmod(0o700)
    write_atomic(target, "first")
    write_atomic(target, "second")
    assert target.read_text() == "second" and os.listdir(target.parent) == ["out.json"]  # no temporary left
