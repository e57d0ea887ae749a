"""The named network namespaces of emulated clusters on this machine: which exist, which were left behind
by a killed run, the processes inside them, and their removal."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path

from gradzip.bench.guard import GUARD
from gradzip.bench.iproute import ClusterError, run, tool

PREFIX = "gz"
NETNS_DIR = Path("/run/netns")
_NS_SUFFIX_RE = re.compile(r"-(?:h\d+|sw)$")


def existing_namespaces() -> list[str]:
    # /run/netns is where `ip netns add` mounts named namespaces; reading it is what `ip netns list` does,
    # without the process start.
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []


def leftover_namespaces(prefix: str = PREFIX) -> list[str]:
    """Namespaces that look like an emulated cluster's (``<prefix>...-h<i>`` or ``...-sw``): a live cluster's,
    or one left behind by a killed process."""
    return [n for n in existing_namespaces() if n.startswith(prefix) and _NS_SUFFIX_RE.search(n)]


def _owner_alive(name: str, prefix: str) -> bool:
    """Whether the process that created the automatically named namespace ``name`` still runs."""
    # The pid is the number before the last "x<n>-" (a longer prefix, like a test's, may hold digits too).
    m = re.match(rf"^{re.escape(prefix)}.*?(\d+)x\d+-(?:h\d+|sw)$", name)
    if not m:
        return False
    pid = int(m.group(1))
    if pid == os.getpid():
        return any(name in c.namespaces for c in GUARD.live.values())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(prefix: str = PREFIX, *, force: bool = False) -> list[str]:
    """Delete the namespaces :func:`leftover_namespaces` finds (their veths and bridge go with them) and return
    their names. A cluster whose creating process still runs is left alone unless ``force``: ``gradzip bench
    --cleanup`` must not pull the network from under a benchmark running in another terminal."""
    names = [n for n in leftover_namespaces(prefix) if force or not _owner_alive(n, prefix)]
    delete_namespaces(names)
    remaining = set(existing_namespaces()) & set(names)
    if remaining:
        raise ClusterError(f"could not delete namespace(s) {', '.join(sorted(remaining))}")
    return names


def pids_in(names: Sequence[str]) -> list[int]:
    """Processes inside the named namespaces (what `ip netns pids` does, for all names in one scan)."""
    wanted = set()
    for name in names:
        try:
            st = os.stat(NETNS_DIR / name)
        except OSError:
            continue
        wanted.add((st.st_dev, st.st_ino))
    if not wanted:
        return []
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry.name}/ns/net")
        except OSError:  # exited meanwhile, or not ours to inspect
            continue
        if (st.st_dev, st.st_ino) in wanted:
            pids.append(int(entry.name))
    return pids


def delete_namespaces(names: Sequence[str]) -> None:
    if not names:
        return
    # A process still inside (a worker the caller did not reap) keeps an unnamed copy of its namespace
    # alive after `ip netns del`; only processes run through the cluster can be in there, so end them.
    for pid in pids_in(names):
        if pid == os.getpid():
            continue
        with suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    ip = tool("ip") or "ip"
    # -force: carry on past a namespace that is already gone; the caller checks what remains.
    script = "".join(f"netns del {n}\n" for n in names)
    with suppress(ClusterError):
        run([ip, "-force", "-batch", "-"], script)
