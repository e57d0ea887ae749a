"""Running ``ip`` and ``tc`` (iproute2) for the emulated cluster: batches, concurrency, and errors that quote
the command and the line that failed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Sequence

from gradzip.util import last_line

_TOOL_TIMEOUT_S = 30.0


class ClusterError(RuntimeError):
    """The emulated cluster could not be set up or removed; the message is one line."""


def tool(name: str) -> str | None:
    """The path of ``ip`` or ``tc``, or None."""
    # sbin is often missing from non-login PATHs (sudo -E, cron), where ip and tc live.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")


def _error_line(text: str) -> str:
    # ip -batch ends with "Command failed -:N", which says less than the error line before it.
    useful = "\n".join(ln for ln in text.splitlines() if not ln.strip().startswith("Command failed"))
    return last_line(useful) or last_line(text) or "no error output"


def run(argv: list[str], script: str | None = None) -> None:
    """Run an ip/tc command (with ``script`` as its -batch input); ClusterError naming it on failure."""
    proc = _start(argv, script)
    _finish(proc, argv, script)


def _start(argv: list[str], script: str | None = None) -> subprocess.Popen[str]:
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if script is not None else subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, LC_ALL="C"),  # stable English errors, to quote them
            # A new session: Ctrl-C in the terminal signals the whole foreground process group, and an ip
            # killed halfway through teardown would leave half a cluster. We handle the signal instead.
            start_new_session=True,
        )
    except OSError as exc:
        raise ClusterError(f"cannot run {' '.join(argv)}: {exc.strerror or exc}") from None


def _finish(proc: subprocess.Popen[str], argv: list[str], script: str | None) -> None:
    try:
        _, err = proc.communicate(script, timeout=_TOOL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise ClusterError(f"{' '.join(argv)} timed out after {_TOOL_TIMEOUT_S:g}s") from None
    if proc.returncode != 0:
        where = ""
        m = re.search(r"Command failed -:(\d+)", err)
        if script is not None and m:  # quote the batch line that failed
            batch = script.splitlines()
            n = int(m.group(1))
            if 0 < n <= len(batch):
                where = f" ({batch[n - 1]!r})"
        raise ClusterError(f"{' '.join(argv)}{where} failed: {_error_line(err)}")


def run_all(jobs: Sequence[tuple[list[str], str | None]]) -> None:
    """Run independent commands concurrently (setup cost is process start-up, not work); first error wins."""
    started: list[tuple[subprocess.Popen[str], list[str], str | None]] = []
    error: ClusterError | None = None
    for argv, script in jobs:
        try:
            started.append((_start(argv, script), argv, script))
        except ClusterError as exc:
            error = error or exc
            break
    for proc, argv, script in started:  # always reap every process started, even after an error
        try:
            _finish(proc, argv, script)
        except ClusterError as exc:
            error = error or exc
    if error is not None:
        raise error
