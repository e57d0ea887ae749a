"""The emulated cluster of ``gradzip bench``: parsing, shaping (an upper bound on throughput only: a busy machine
may be slower than the link, never faster), isolation from the root namespace, and cleanup on every way out
(``with``, exceptions, failed setup, SIGINT, SIGTERM, atexit; SIGKILL leaves namespaces that
``remove_leftovers`` deletes).

Tests that build namespaces need root and iproute2, and are skipped with that reason otherwise. Each run uses
its own namespace prefix, so parallel runs (and real benchmarks) never see each other's namespaces.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest

import gradzip.bench.cluster as cluster_mod
from gradzip.bench.cluster import EmulatedCluster
from gradzip.bench.guard import GUARD
from gradzip.bench.iproute import ClusterError
from gradzip.bench.netns import leftover_namespaces, pids_in, remove_leftovers
from gradzip.bench.network import BANDWIDTHS, check_can_emulate, parse_bandwidth, parse_latency

_CAN_EMULATE = os.geteuid() == 0 and shutil.which("ip", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
needs_root = pytest.mark.skipif(
    not _CAN_EMULATE, reason="network namespaces and tc need root and iproute2 (ip, tc)"
)

# Unique to this test process: its namespaces cannot be confused with another run's or a benchmark's.
PREFIX = f"gzt{os.getpid()}p"
# The cluster's modules import the standard library only (and `import gradzip` is lazy), so a child process
# that needs a cluster starts without torch: tenths of a second, not two seconds.
CHILD_PRELUDE = """
import sys
import gradzip.bench.cluster as cl
assert "torch" not in sys.modules
"""

RECEIVER = r"""
import socket, sys, time
s = socket.socket()
s.bind((sys.argv[1], 0))
s.listen(1)
print("ready", s.getsockname()[1], flush=True)
c, _ = s.accept()
n, t0 = 0, None
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    if t0 is None:
        t0 = time.perf_counter()
    n += len(b)
print(n, time.perf_counter() - t0, flush=True)
"""

SENDER = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
c.sendall(b"x" * int(sys.argv[3]))
c.close()
"""

SIZE = 3_000_000


@pytest.fixture(autouse=True)
def _no_leftovers():
    """Every test must leave none of this run's namespaces behind (even the ones that expect SIGKILL's)."""
    yield
    left = leftover_namespaces(PREFIX)
    if left:
        remove_leftovers(PREFIX, force=True)
    assert not left, f"namespaces left behind: {left}"


def _readline(proc: subprocess.Popen[str], timeout: float = 15.0) -> str:
    """A line of the child's stdout, without hanging the suite if the child dies or stalls."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "child printed nothing in time"
    return proc.stdout.readline()


def transfer(
    cluster: EmulatedCluster, receiver: int = 0, sender: int = 1, size: int = SIZE
) -> tuple[int, float]:
    """Send ``size`` bytes from host ``sender`` to host ``receiver`` over TCP; bytes received and seconds."""
    address = cluster.hosts[receiver].address
    recv = subprocess.Popen(
        cluster.command(receiver, [sys.executable, "-c", RECEIVER, address]),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        word, port = _readline(recv).split()
        assert word == "ready"
        subprocess.run(
            cluster.command(sender, [sys.executable, "-c", SENDER, address, port, str(size)]),
            check=True,
            timeout=30,
        )
        got, seconds = _readline(recv, 30).split()
        recv.wait(timeout=10)
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
    return int(got), float(seconds)


def _root_view() -> tuple[set[str], str, str]:
    """The root namespace's link names, addresses and routes."""
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    names = {line.split(":")[1].strip().split("@")[0] for line in links.splitlines()}
    addrs = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
    routes = subprocess.run(["ip", "route", "show", "table", "all"], capture_output=True, text=True).stdout
    return names, addrs, routes


# ------------------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    ("text", "bits"),
    [
        ("100mbit", 100_000_000),
        ("1gbit", 10**9),
        ("10gbit", 10**10),
        ("unlimited", None),
        ("250mbit", 250_000_000),
        ("2.5gbit", 2_500_000_000),
        (" 1GBIT ", 10**9),
        ("500kbit", 500_000),
    ],
)
def test_parse_bandwidth(text: str, bits: int | None) -> None:
    assert parse_bandwidth(text) == bits
    assert parse_bandwidth(text) == BANDWIDTHS.get(text, bits)


@pytest.mark.parametrize(
    "text", ["", "1gb", "fast", "100", "-1gbit", "1 gbit", "0mbit", "10kbit", "1e9bit", "mbit"]
)
def test_parse_bandwidth_rejects(text: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_bandwidth(text)
    message = str(err.value)
    assert repr(text) in message and "unlimited" in message and "250mbit" in message


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0ms", 0.0), ("0", 0.0), ("1ms", 1e-3), ("0.5ms", 5e-4), ("200us", 2e-4), ("2s", 2.0), (".5ms", 5e-4)],
)
def test_parse_latency(text: str, seconds: float) -> None:
    assert parse_latency(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "1", "ms", "-1ms", "1 ms", "fast", "1min", "20s", "1e-3s"])
def test_parse_latency_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid latency"):
        parse_latency(text)


# ------------------------------------------------------------------------------ permission checks


def test_check_can_emulate_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ClusterError) as err:
        check_can_emulate("1gbit")
    assert str(err.value) == (
        "emulating a 1gbit link needs root (network namespaces and tc); run as root or use --bandwidth unlimited"
    )
    with pytest.raises(ClusterError, match="250mbit"):
        check_can_emulate("250mbit")
    check_can_emulate("unlimited")  # loopback needs nothing
    # And the cluster itself refuses before creating anything.
    with pytest.raises(ClusterError, match="needs root"), EmulatedCluster(2, "100mbit", prefix=PREFIX):
        pass


def test_check_can_emulate_needs_iproute2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    with pytest.raises(ClusterError, match="iproute2"):
        check_can_emulate("100mbit")
    check_can_emulate("unlimited")
    with pytest.raises(ValueError, match="invalid bandwidth"):
        check_can_emulate("fast")


def test_the_cluster_starts_without_torch() -> None:
    proc = subprocess.run([sys.executable, "-c", CHILD_PRELUDE], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_unlimited_creates_nothing() -> None:
    before = set(leftover_namespaces(""))
    with EmulatedCluster(3, "unlimited", prefix=PREFIX) as c:
        assert [h.address for h in c.hosts] == ["127.0.0.1"] * 3
        assert all(h.netns is None for h in c.hosts)
        assert c.namespaces == []
        assert c.command(2, ["python", "-V"]) == ["python", "-V"]
        assert set(leftover_namespaces("")) == before
    with pytest.raises(ClusterError, match="unlimited"):
        EmulatedCluster(2, "unlimited", "1ms")


# ------------------------------------------------------------------------------- emulated links


@needs_root
def test_shaped_and_isolated() -> None:
    root_before = _root_view()
    with EmulatedCluster(3, "100mbit", prefix=PREFIX) as c:
        assert [h.address for h in c.hosts] == ["10.77.0.1", "10.77.0.2", "10.77.0.3"]
        assert set(c.namespaces) == set(leftover_namespaces(PREFIX))
        assert len(c.namespaces) == 4 and all(len(n) < 64 for n in c.namespaces)
        assert c.command(1, ["true"])[-4:] == ["netns", "exec", c.hosts[1].netns, "true"]
        for h in c.hosts:
            assert h.netns is not None
            lo = subprocess.run(
                ["ip", "-n", h.netns, "-o", "link", "show", "lo"], capture_output=True, text=True
            )
            assert ",UP" in lo.stdout  # gloo may bind or resolve through loopback
            qdisc = subprocess.run(
                ["tc", "-n", h.netns, "qdisc", "show", "dev", "eth0"], capture_output=True, text=True
            )
            assert "tbf" in qdisc.stdout and "rate 100Mbit" in qdisc.stdout

        got, seconds = transfer(c)
        assert got == SIZE
        mbit = got * 8 / seconds / 1e6
        # Upper bound only: shaping caps the rate; a loaded machine may make it slower, never faster.
        assert mbit < 200, f"{mbit:.0f} Mbit/s through a 100mbit link"

        # The root namespace gained no link, address or route to the cluster. (Checked by reading its
        # tables only: a connection attempt from here would leave the machine by the default route, and
        # traffic to a private address outside our own namespaces is never allowed.)
        links, addrs, routes = _root_view()
        assert links == root_before[0]
        assert "10.77." not in addrs and "10.77." not in routes
        recv = subprocess.Popen(
            c.command(0, [sys.executable, "-c", RECEIVER, "0.0.0.0"]), stdout=subprocess.PIPE, text=True
        )
        try:
            port = int(_readline(recv).split()[1])
            # A cluster host reaches it (the listener is really there).
            subprocess.run(
                c.command(2, [sys.executable, "-c", SENDER, "10.77.0.1", str(port), "10"]), check=True
            )
            assert _readline(recv).split()[0] == "10"
        finally:
            recv.kill()
            recv.wait()
    assert not set(c.namespaces) & set(leftover_namespaces(PREFIX))
    assert _root_view()[0] == root_before[0]


def test_unlimited_control() -> None:
    with EmulatedCluster(2, "unlimited", prefix=PREFIX) as c:
        got, _ = transfer(c)
    assert got == SIZE  # no bound: only that the same transfer runs on loopback


@needs_root
def test_latency_is_emulated_or_refused_cleanly() -> None:
    try:
        with EmulatedCluster(2, "1gbit", "10ms", prefix=PREFIX) as c:
            ns = c.hosts[0].netns
            assert ns is not None
            qdisc = subprocess.run(
                ["tc", "-n", ns, "qdisc", "show", "dev", "eth0"], capture_output=True, text=True
            )
            # Half the one-way delay on each of the two links a packet crosses.
            assert "netem" in qdisc.stdout and "delay 5ms" in qdisc.stdout and "tbf" in qdisc.stdout
            assert transfer(c, size=100_000)[0] == 100_000
    except ClusterError as err:
        # This kernel has no netem: the error says so, and the half-built cluster is gone (fixture).
        assert "netem" in str(err) and "--latency 0ms" in str(err)


# ------------------------------------------------------------------------------------------ cleanup


@needs_root
def test_cleanup_after_exception_and_lingering_worker() -> None:
    with pytest.raises(RuntimeError, match="worker failed"), EmulatedCluster(2, "1gbit", prefix=PREFIX) as c:
        names = c.namespaces
        assert set(names) <= set(leftover_namespaces(PREFIX))
        crashed = subprocess.run(c.command(1, [sys.executable, "-c", "raise SystemExit(3)"]))
        # A worker still running inside would keep its namespace alive: close() ends it.
        lingering = subprocess.Popen(c.command(0, ["sleep", "30"]))
        deadline = time.monotonic() + 10
        while lingering.pid not in pids_in(names[:1]):  # until `ip netns exec` has entered
            assert time.monotonic() < deadline, "the worker never entered its namespace"
            time.sleep(0.01)
        raise RuntimeError(f"worker failed with {crashed.returncode}")
    assert not set(names) & set(leftover_namespaces(PREFIX))
    assert lingering.wait(timeout=5) == -signal.SIGKILL
    c.close()  # idempotent


@needs_root
def test_failed_setup_removes_partial_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        cluster_mod, "_qdisc_lines", lambda dev, rate, delay: f"qdisc add dev {dev} root nosuch\n"
    )
    with pytest.raises(ClusterError) as err, EmulatedCluster(3, "1gbit", prefix=PREFIX):
        pass
    message = str(err.value)
    assert "tc" in message and "nosuch" in message and "\n" not in message
    assert leftover_namespaces(PREFIX) == []


@needs_root
def test_existing_namespace_is_not_ours_to_delete() -> None:
    name = f"{PREFIX}clash"
    subprocess.run(["ip", "netns", "add", f"{name}-h1"], check=True)
    try:
        with pytest.raises(ClusterError, match="already exists"), EmulatedCluster(2, "1gbit", name=name):
            pass
        assert leftover_namespaces(PREFIX) == [f"{name}-h1"]  # untouched
        # Its creator cannot be told from the name, so only force removes it... or a plain call: not alive.
        assert remove_leftovers(PREFIX) == [f"{name}-h1"]
    finally:
        subprocess.run(["ip", "netns", "del", f"{name}-h1"], capture_output=True)


@needs_root
def test_setup_and_teardown_times_are_recorded() -> None:
    # Recorded, not asserted: wall-clock bounds do not belong in tests on a shared machine (measured
    # ~0.1 s for both on 2 cores).
    with EmulatedCluster(4, "1gbit", prefix=PREFIX) as c:
        assert c.setup_s > 0
    assert c.teardown_s > 0 and not set(c.namespaces) & set(leftover_namespaces(PREFIX))


def _default_sigint() -> None:
    # A shell starts background jobs with SIGINT ignored, and an ignored signal stays ignored across exec:
    # under `make test &` the child would never see Ctrl-C. Give it what a process in a terminal has.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _child(body: str, prefix: str) -> subprocess.Popen[str]:
    script = CHILD_PRELUDE + body
    return subprocess.Popen(
        [sys.executable, "-c", script, prefix], stdout=subprocess.PIPE, text=True, preexec_fn=_default_sigint
    )


WAIT_INSIDE = """
import time
with cl.EmulatedCluster(2, "100mbit", prefix=sys.argv[1]) as c:
    print(" ".join(c.namespaces), flush=True)
    time.sleep(60)
"""


@needs_root
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_removes_cluster(sig: signal.Signals) -> None:
    prefix = f"{PREFIX}{sig.name[3:].lower()}"
    proc = _child(WAIT_INSIDE, prefix)
    try:
        names = _readline(proc).split()
        assert len(names) == 3 and set(names) == set(leftover_namespaces(prefix))
        os.kill(proc.pid, sig)
        # Python's own exit status for either signal: killed by it (the handler hands it on).
        assert proc.wait(timeout=15) == -sig
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert leftover_namespaces(prefix) == []


@needs_root
def test_atexit_removes_cluster_left_open() -> None:
    body = """
c = cl.EmulatedCluster(2, "100mbit", prefix=sys.argv[1])
c.__enter__()
print(" ".join(c.namespaces), flush=True)
sys.exit(0)
"""
    prefix = f"{PREFIX}exit"
    proc = _child(body, prefix)
    assert len(_readline(proc).split()) == 3
    assert proc.wait(timeout=15) == 0
    assert leftover_namespaces(prefix) == []


@needs_root
def test_sigkill_leaves_namespaces_that_remove_leftovers_deletes() -> None:
    prefix = f"{PREFIX}kill"
    proc = _child(WAIT_INSIDE, prefix)
    try:
        names = _readline(proc).split()
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=15) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert sorted(leftover_namespaces(prefix)) == sorted(names)
    assert sorted(remove_leftovers(prefix)) == sorted(names)
    assert leftover_namespaces(prefix) == []


@needs_root
def test_remove_leftovers_spares_a_live_cluster() -> None:
    with EmulatedCluster(2, "1gbit", prefix=PREFIX) as c:
        assert remove_leftovers(PREFIX) == []  # its creator (this process) is alive and still uses it
        assert set(c.namespaces) <= set(leftover_namespaces(PREFIX))
    # Handlers are handed back once no cluster is open.
    assert signal.getsignal(signal.SIGTERM) != GUARD.on_signal  # a bound method: compared by equality
    assert signal.getsignal(signal.SIGINT) != GUARD.on_signal
    with EmulatedCluster(2, "1gbit", prefix=PREFIX):  # control: while one is open, ours are installed
        assert signal.getsignal(signal.SIGTERM) == GUARD.on_signal
