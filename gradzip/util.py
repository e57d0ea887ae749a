"""Small helpers every layer uses, with no gradzip (or torch) dependency: one-line error text, byte counts,
free ports, output files."""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none): what fits one report line."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def last_line(text: str) -> str:
    """The last non-blank line of ``text``, stripped ("" when there is none): where a traceback or a tool's
    output says what finally went wrong."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def format_bytes(n: float | None) -> str:
    """``n`` bytes in decimal units (B, kB, MB, GB), as every table and summary of gradzip shows them."""
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it). The short window before the caller binds it
    is accepted: a clash fails loudly at startup, it cannot corrupt a run."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_writable(path: Path, what: str) -> None:
    """Raise ValueError, naming ``what`` (e.g. ``--json``) and the reason, unless a file can be written at
    ``path`` (its folder is created if need be). Called before a long run, so the run's result is never lost
    to a path that was wrong from the start; nothing is left at ``path`` by the check."""
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory; give the path of a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=True):
            pass
    except OSError as err:
        raise ValueError(f"cannot write {what} {path}: {err.strerror or err}") from None


@contextmanager
def atomic_file(path: Path) -> Iterator[IO[bytes]]:
    """A binary file that becomes ``path`` only once it is whole: written under a temporary name beside it,
    fsynced and renamed, so a crash while writing leaves the previous file (or none), never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        try:
            yield f
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            os.unlink(f.name)
            raise
    os.replace(f.name, path)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through ``atomic_file``."""
    with atomic_file(path) as f:
        f.write(text.encode())


# Words of a failed wait on another process: gloo's timeouts and closed connections.
_FAILED_WAIT = ("timed out", "timeout", "closure", "connection reset", "connection closed", "broken pipe")


def is_failed_wait(text: str) -> bool:
    """Whether an error's text says a wait on another process failed (a consequence of a peer's trouble)."""
    lowered = text.lower()
    return any(word in lowered for word in _FAILED_WAIT)


def comma_list(kind: Any) -> Any:
    """An argparse ``type`` for a comma-separated list of ``kind`` (``int``, ``str``, or a converter that
    raises ValueError or ArgumentTypeError): every item converted, blanks dropped, an empty list refused."""

    def parse(text: str) -> list[Any]:
        try:
            values = [kind(x.strip()) for x in text.split(",") if x.strip()]
        except (ValueError, argparse.ArgumentTypeError):
            name = getattr(kind, "__name__", "value")
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {name}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"{text!r} is an empty list")
        return values

    return parse
