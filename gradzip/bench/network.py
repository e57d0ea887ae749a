"""Link speeds and delays of the emulated cluster: parsing what the user typed, and whether this machine can
emulate it at all."""

from __future__ import annotations

import os
import re

from gradzip.bench.iproute import ClusterError, tool

BANDWIDTHS: dict[str, int | None] = {
    "100mbit": 100_000_000,
    "1gbit": 10**9,
    "10gbit": 10**10,
    "unlimited": None,
}

_RATE_RE = re.compile(r"^(\d+(?:\.\d+)?|\.\d+)(kbit|mbit|gbit)$")
_RATE_UNITS = {"kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
_TIME_RE = re.compile(r"^(\d+(?:\.\d+)?|\.\d+)(s|ms|us)$")
_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}


def parse_bandwidth(text: str) -> int | None:
    """Bits per second of ``"1gbit"``, ``"250mbit"``, ``"2.5gbit"``...; None for ``"unlimited"``."""
    key = text.strip().lower()
    if key in BANDWIDTHS:
        return BANDWIDTHS[key]
    m = _RATE_RE.match(key)
    if m:
        bits = round(float(m.group(1)) * _RATE_UNITS[m.group(2)])
        # Below ~100 kbit/s a single full frame takes longer than tbf's queue allows: useless as a link.
        if bits >= 100_000:
            return bits
    raise ValueError(
        f"invalid bandwidth {text!r}: use one of {', '.join(BANDWIDTHS)} or a rate such as 250mbit or "
        "2.5gbit (kbit, mbit, gbit; at least 100kbit)"
    )


def parse_latency(text: str) -> float:
    """Seconds of ``"0ms"``, ``"1ms"``, ``"0.5ms"``, ``"200us"``, ``"0"``."""
    key = text.strip().lower()
    if key == "0":
        return 0.0
    m = _TIME_RE.match(key)
    if m:
        seconds = float(m.group(1)) * _TIME_UNITS[m.group(2)]
        if seconds <= 10.0:  # more is surely a typo (10s instead of 10ms) and would stall every collective
            return seconds
    raise ValueError(
        f"invalid latency {text!r}: use a one-way delay such as 0ms, 1ms, 0.5ms or 200us (s, ms, us; at most 10s)"
    )


def check_can_emulate(bandwidth: str) -> None:
    """Raise ClusterError (one line, saying what to do) when a cluster at ``bandwidth`` cannot be built here.

    Only the cheap checks: root and iproute2. A kernel without netns, veth, bridge or tbf support (or a
    container without CAP_NET_ADMIN) is reported by EmulatedCluster itself, with the failing command.
    """
    bits = parse_bandwidth(bandwidth)
    if bits is None:
        return
    label = bandwidth.strip().lower()
    if os.geteuid() != 0:
        raise ClusterError(
            f"emulating a {label} link needs root (network namespaces and tc); run as root or use "
            "--bandwidth unlimited"
        )
    missing = [name for name in ("ip", "tc") if tool(name) is None]
    if missing:
        raise ClusterError(
            f"emulating a {label} link needs the {' and '.join(missing)} command{'s' if len(missing) > 1 else ''} "
            "(iproute2), not found; install iproute2 or use --bandwidth unlimited"
        )
