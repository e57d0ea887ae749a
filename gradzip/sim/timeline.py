"""One training iteration as a timeline: two resources, the worker's compute thread and its link.

A data-parallel step with a DDP comm hook (every hook method, and ``ssgd``) runs like this:

1. forward; then backward, gradients becoming ready in the profile's order;
2. when the last gradient of a bucket is ready, the hook runs on the backward thread (``hook_s``: the
   compression, which holds backward up) and issues the bucket's first collective; collectives share the
   link one after another in issue order (``first_s``), overlapping the rest of backward (pipelining);
3. in the last bucket's hook, after backward: the step's vote on non-finite gradients (one tiny all-reduce);
   then, bucket by bucket, the work between two rounds once the first has landed (``mid_s``, PowerSGD's
   orthogonalization and second projection) and the second collective (``second_s``);
4. bucket by bucket, once its last collective has landed, the decode (``finish_s``);
5. the optimizer step.

Methods that talk after backward (parameter servers) or after the optimizer step (gossip) have one exchange
block there instead: compute before it, the link time, compute after it.

Everything here is arithmetic on a plan: :mod:`gradzip.sim.plans` says what each method puts where.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class BucketWork:
    """One bucket's work in one step (seconds), and the bytes this worker sends for it."""

    hook_s: float
    first_s: float
    mid_s: float = 0.0
    second_s: float | None = None
    finish_s: float = 0.0
    sent_bytes: float = 0.0
    ready_layer: int = 0
    """Index (in the profile's ready order) of the bucket's last gradient."""
    copy_s: float = 0.0
    """DDP's copy of the gradients into the bucket (in the hook's place) and of the result back (with the
    decode): part of every DDP step, so counted as compute, not as the method's compression."""


@dataclass(frozen=True)
class Exchange:
    """An exchange outside backward: ``before_s`` compute, ``link_s`` on the link, ``after_s`` compute."""

    before_s: float
    link_s: float
    after_s: float
    sent_bytes: float
    after_step: bool = False
    """True for gossip (after the optimizer step), False for parameter servers (after backward)."""
    server_s: float = 0.0
    """Work on the server between the workers' push and its reply (the workers wait for it)."""


@dataclass(frozen=True)
class Segment:
    """A span of one resource's time: ``resource`` is ``compute``, ``link`` or ``server``."""

    resource: str
    label: str
    start: float
    end: float


@dataclass
class Timeline:
    """The result of :func:`run`: when the step ends and what each resource did."""

    iteration_s: float
    compute_s: float
    """Forward, backward, optimizer and DDP's bucket copies: the step without communication."""
    compression_s: float
    """Compute the method added (hooks, rounds, decodes, exchange and server compute)."""
    link_s: float
    """Time the link was busy."""
    sent_bytes: float
    """Bytes this worker puts on its link per step (a ring moves 2(n-1)/n of an all-reduced tensor)."""
    segments: list[Segment] = field(default_factory=list)

    @property
    def exposed_s(self) -> float:
        """Communication not hidden behind compute: the step less its compute and compression."""
        return max(0.0, self.iteration_s - self.compute_s - self.compression_s)


def run(
    forward_s: float,
    backward_s: list[float],
    optimizer_s: float,
    buckets: list[BucketWork] | None = None,
    exchange: Exchange | None = None,
    vote_s: float = 0.0,
    link_uses_cpu: bool = False,
) -> Timeline:
    """The step's timeline: ``backward_s`` per gradient in ready order; ``buckets`` for a hook method (in
    launch order, each with its ``ready_layer``), or ``exchange`` for one that talks outside backward.

    ``link_uses_cpu``: moving bytes takes the cores the step computes on (a loopback "link" between
    processes that already share every core), so communication cannot hide behind compute: each transfer
    holds the compute thread up for as long as it lasts."""
    seg: list[Segment] = []
    cpu = 0.0
    link_free = 0.0
    compression = 0.0
    link_busy = 0.0

    def compute(label: str, seconds: float, after: float = 0.0, overhead: bool = False) -> None:
        nonlocal cpu, compression
        start = max(cpu, after)
        cpu = start + seconds
        if seconds > 0:
            seg.append(Segment("compute", label, start, cpu))
        if overhead:
            compression += seconds

    def send(label: str, seconds: float, issued: float) -> float:
        nonlocal link_free, link_busy, cpu
        start = max(issued, link_free, cpu if link_uses_cpu else 0.0)
        link_free = start + seconds
        link_busy += seconds
        if seconds > 0:
            seg.append(Segment("link", label, start, link_free))
        if link_uses_cpu:
            cpu = link_free
        return link_free

    def exchange_block(ex: Exchange) -> None:
        nonlocal compression
        compute("exchange: compress", ex.before_s, overhead=True)
        done = send("exchange", ex.link_s, cpu)
        if ex.server_s:
            seg.append(Segment("server", "server", done, done + ex.server_s))
            compression += ex.server_s
            done += ex.server_s
        compute("exchange: decode", ex.after_s, after=done, overhead=True)

    compute("forward", forward_s)
    by_layer: dict[int, list[int]] = {}
    for i, b in enumerate(buckets or []):
        by_layer.setdefault(b.ready_layer, []).append(i)
    first_done: list[float] = [0.0] * len(buckets or [])
    start_backward = cpu
    for j, t in enumerate(backward_s):
        cpu += t
        for i in by_layer.get(j, []):
            b = (buckets or [])[i]
            if cpu > start_backward:
                seg.append(Segment("compute", "backward", start_backward, cpu))
            compute(f"copy into bucket {i}", b.copy_s)
            compute(f"hook {i}", b.hook_s, overhead=True)
            first_done[i] = send(f"bucket {i}", b.first_s, cpu)
            start_backward = cpu
    if cpu > start_backward:
        seg.append(Segment("compute", "backward", start_backward, cpu))
    if exchange is not None and not exchange.after_step:
        exchange_block(exchange)
    if buckets:
        if vote_s:
            # The vote is a collective of the same process group: it queues behind the buckets' (NCCL runs a
            # group's collectives in order; gloo may overlap two, which this leaves out).
            compute("vote", 0.0, after=send("vote", vote_s, cpu))
        last_done = list(first_done)
        for i, b in enumerate(buckets):
            if b.second_s is not None:
                compute(f"round 2, bucket {i}", b.mid_s, after=first_done[i], overhead=True)
                last_done[i] = send(f"bucket {i}, round 2", b.second_s, cpu)
        for i, b in enumerate(buckets):
            compute(f"decode {i}", b.finish_s, after=last_done[i], overhead=True)
            compute(f"copy back {i}", b.copy_s)
    compute("optimizer", optimizer_s)
    if exchange is not None and exchange.after_step:
        exchange_block(exchange)
    sent = exchange.sent_bytes if exchange is not None else sum(b.sent_bytes for b in buckets or [])
    return Timeline(
        iteration_s=cpu,
        compute_s=forward_s + sum(backward_s) + optimizer_s + 2 * sum(b.copy_s for b in buckets or []),
        compression_s=compression,
        link_s=link_busy,
        sent_bytes=sent,
        segments=seg,
    )
