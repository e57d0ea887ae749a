"""What each method puts where in a step: the simulator's plan of every registry method.

A plan turns a profile (what the model costs here), a cluster (workers, link, bucket size) and a method's
options into the work of :mod:`gradzip.sim.timeline`: per DDP bucket, the compute in the hook, the first
collective, the work between rounds, a second collective, the decode; or one exchange block outside backward.

Local work comes from the profile's kernel measurements per gradient element (``compress_s_per_element``, a
method's whole compress + decompress at a world of one), split between the places the method does it:

* all-gather compressors (``signsgd``, ``topk``, ``qsgd``): the encode in the hook, then one decode per
  worker (``decode_s_per_element`` each) after backward;
* ``randomk`` and ``fp16`` (all-reduce of the values or halves): encode in the hook, the decode's share after;
* ``powersgd``: a third in the hook (M = G + e, P = M Q), a third between its rounds (orthogonalize,
  Q = M^T P), a third after (the residual and the decompression);
* ``acpsgd``: half in the hook (one projection), half after (the residual), one round;
* work the kernel bench does not time (gossip's averaging and projections) is counted in passes over the
  parameters at the profile's copy rate.

Bytes are the methods' own payload sizes (:meth:`Compressor.payload_nbytes`, the low-rank factors' shapes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gradzip.sim import network
from gradzip.sim.network import Link
from gradzip.sim.profile import Layer, ModelProfile
from gradzip.sim.timeline import BucketWork, Exchange

FLOAT = 4  # bytes of a float32 gradient element

# The kernel bench's row for each compressor name.
KERNEL_OF = {"signsgd": "sign", "topk": "topk", "randomk": "randomk", "qsgd": "qsgd", "fp16": "fp16"}
# Share of a compressor's world-of-one work that is its decode when the profile has no split for it.
DECODE_SHARE = {"randomk": 0.2, "fp16": 0.5, "identity": 0.0}


@dataclass(frozen=True)
class Cluster:
    """Where the step runs: ``workers`` data-parallel workers, one link each."""

    workers: int
    link: Link
    bucket_cap_mb: float = 25.0
    """DDP's bucket size (gradzip passes it explicitly, so DDP's 1 MB first bucket does not apply)."""

    def __post_init__(self) -> None:
        if not isinstance(self.workers, int) or self.workers < 2:
            raise ValueError(f"workers={self.workers!r} is invalid: a cluster has >= 2 workers")
        if not self.bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb={self.bucket_cap_mb!r} is invalid: it must be > 0")


@dataclass(frozen=True)
class Plan:
    """One step of a method: per-bucket work (hook methods) or an exchange, and a one-line summary of what it
    sends. ``buckets`` holds one list per step of the method's cycle when consecutive steps differ (ACP-SGD's
    P- and Q-steps): the prediction is their mean."""

    buckets: list[list[BucketWork]] | None = None
    exchange: Exchange | None = None
    vote_s: float = 0.0
    wire: str = ""
    worker_optimizer: bool = True
    """False where the worker runs no optimizer step of its own (asynchronous DoubleSqueeze's servers do)."""
    server_busy_s: float = 0.0
    """A server's work per step over every worker's push: the shortest a step can be (asynchronous)."""


def ddp_buckets(layers: list[Layer], cap_mb: float) -> list[list[int]]:
    """Indices of ``layers`` (ready order) in DDP's buckets: a bucket closes once it holds ``cap_mb`` MiB."""
    cap = cap_mb * 2**20
    out: list[list[int]] = [[]]
    size = 0
    for i, layer in enumerate(layers):
        out[-1].append(i)
        size += layer.numel * FLOAT
        if size >= cap:
            out.append([])
            size = 0
    return [b for b in out if b]


class _Ctx:
    """What every plan reads: the profile, the cluster, the method's options and its buckets."""

    def __init__(self, profile: ModelProfile, cluster: Cluster, options: dict[str, Any]) -> None:
        self.p, self.c, self.opt = profile, cluster, options
        self.n, self.link = cluster.workers, cluster.link
        self.buckets = ddp_buckets(profile.layers, cluster.bucket_cap_mb)

    def layers(self, bucket: list[int]) -> list[Layer]:
        return [self.p.layers[i] for i in bucket]

    def numel(self, bucket: list[int]) -> int:
        return sum(layer.numel for layer in self.layers(bucket))

    def per_element(self, kernel: str) -> float:
        if kernel not in self.p.compress_s_per_element:
            have = ", ".join(sorted(self.p.compress_s_per_element)) or "none"
            raise ValueError(
                f"profile of {self.p.model!r} has no kernel cost for {kernel!r} (it has: {have}); "
                "measure one with gradzip profile"
            )
        return self.p.compress_s_per_element[kernel]

    def copy_s(self, numel: float, passes: float = 1.0, fresh: float = 0.0) -> float:
        """Seconds for ``passes`` read-and-write sweeps over ``numel`` floats at the profile's copy rate, and
        ``fresh`` new tensors of that size (allocated and first written: their page faults)."""
        return passes * numel * FLOAT / self.p.copy_bytes_per_s + fresh * numel * self.p.alloc_s_per_element

    def split(self, compressor: str) -> tuple[float, float]:
        """(encode, decode-one-payload) seconds per element of ``compressor``."""
        if compressor == "identity":
            return 0.0, 0.0
        total = self.per_element(KERNEL_OF[compressor])
        dec = self.p.decode_s_per_element.get(compressor)
        if dec is None:
            dec = total * DECODE_SHARE.get(compressor, 0.3)
        dec = min(dec, total)
        return total - dec, dec

    def standalone(self, compressor: str) -> tuple[float, float]:
        """(plain encode, dense decode) seconds per element of ``compressor``: measured where the profile has
        them, else the fused split (:meth:`split`)."""
        have = self.p.standalone_s_per_element
        if f"{compressor}.encode" in have:
            return have[f"{compressor}.encode"], have[f"{compressor}.decode"]
        return self.split(compressor)

    def vote_s(self) -> float:
        return network.all_reduce(self.link, FLOAT * self.n, self.n)


def _compressor(name: str, opt: dict[str, Any]) -> Any:
    from gradzip.config import make_compressor

    kwargs = {k: opt[k] for k in ("density", "levels") if opt.get(k) is not None}
    return make_compressor(name, **kwargs)


# ------------------------------------------------------------------------------------- hook methods


def _split(x: _Ctx, comp: Any, bucket: list[int]) -> tuple[int, int, int]:
    """(compressed elements, their payload bytes, raw elements) of a bucket, per tensor as the element-wise
    reducer decides: a matrix is compressed when its payload (with the alignment padding) saves at least
    ``min_compression_rate``; 1-D tensors and the rest travel raw."""
    import torch

    from gradzip.compress.base import is_matrix_worth_it
    from gradzip.compress.fusion import ByteLayout

    min_rate = float(x.opt.get("min_compression_rate", 2.0))
    numel = payload = raw = 0
    for layer in x.layers(bucket):
        sent = ByteLayout(comp.payload_spec(layer.numel)).nbytes
        if is_matrix_worth_it(torch.Size(layer.shape), sent, min_rate):
            numel += layer.numel
            payload += sent
        else:
            raw += layer.numel
    return numel, payload, raw


def _allreduce(x: _Ctx, name: str) -> Plan:
    """``ssgd``, ``fp16``, ``randomk``: one all-reduce per bucket of the (compressed) values, raw tensors in
    the same message."""
    work = []
    for b in x.buckets:
        numel = x.numel(b)
        if name == "ssgd":
            enc, dec, nbytes = x.copy_s(numel), 0.0, numel * FLOAT
        else:
            compressed, payload, raw = _split(x, _compressor(name, x.opt), b)
            e, d = x.split(name)
            enc, dec = e * compressed + x.copy_s(raw), d * compressed
            nbytes = payload + raw * FLOAT
        link = network.all_reduce(x.link, nbytes, x.n)
        sent = network.ring_all_reduce_bytes(nbytes, x.n)
        work.append(BucketWork(enc, link, 0.0, None, dec, sent, b[-1]))
    wire = "the gradients" if name == "ssgd" else f"{name}'s payload (raw tensors beside it)"
    return Plan([work], vote_s=x.vote_s(), wire=f"one all-reduce per bucket of {wire}")


def _allgather(x: _Ctx, name: str) -> Plan:
    """``signsgd``, ``topk``, ``qsgd``: an all-gather of each worker's payload, one decode per worker; the
    raw tensors (1-D, or too small to gain) in an all-reduce of their own."""
    comp = _compressor(name, x.opt)
    e, d = x.split(name)
    work = []
    for b in x.buckets:
        compressed, payload, raw = _split(x, comp, b)
        link = network.all_gather(x.link, payload, x.n) if compressed else 0.0
        sent = network.ring_all_gather_bytes(payload, x.n)
        if raw:
            link += network.all_reduce(x.link, raw * FLOAT, x.n)
            sent += network.ring_all_reduce_bytes(raw * FLOAT, x.n)
        enc = e * compressed + x.copy_s(raw)
        work.append(BucketWork(enc, link, 0.0, None, d * compressed * x.n, sent, b[-1]))
    return Plan([work], vote_s=x.vote_s(), wire=f"one all-gather per bucket of {name}'s payload")


def _lowrank_shapes(x: _Ctx, bucket: list[int]) -> tuple[list[tuple[int, int, int]], int]:
    """(rows, cols, r) of the bucket's compressed matrices and the element count sent raw."""
    rank = int(x.opt.get("rank", 4))
    min_rate = float(x.opt.get("min_compression_rate", 2.0))
    shapes, raw = [], 0
    for layer in x.layers(bucket):
        if len(layer.shape) >= 2:
            rows = layer.shape[0]
            cols = layer.numel // rows
            r = min(rank, rows, cols)
            if layer.numel >= min_rate * r * (rows + cols):
                shapes.append((rows, cols, r))
                continue
        raw += layer.numel
    return shapes, raw


def _powersgd(x: _Ctx, name: str) -> Plan:
    per = x.per_element("powersgd")
    work = []
    for b in x.buckets:
        numel = x.numel(b)
        shapes, raw = _lowrank_shapes(x, b)
        p_bytes = FLOAT * (sum(rows * r for rows, _, r in shapes) + raw)
        q_bytes = FLOAT * sum(cols * r for _, cols, r in shapes)
        second = network.all_reduce(x.link, q_bytes, x.n) if shapes else None
        third = per * numel / 3
        first = network.all_reduce(x.link, p_bytes, x.n)
        sent = network.ring_all_reduce_bytes(p_bytes, x.n) + network.ring_all_reduce_bytes(q_bytes, x.n)
        work.append(BucketWork(third, first, third, second, third, sent, b[-1]))
    return Plan([work], vote_s=x.vote_s(), wire="P per bucket in backward, then Q per bucket after it")


def _acpsgd(x: _Ctx, name: str) -> Plan:
    per = x.per_element("acpsgd")
    steps: list[list[BucketWork]] = [[], []]
    for b in x.buckets:
        numel = x.numel(b)
        shapes, raw = _lowrank_shapes(x, b)
        for step, side in enumerate((0, 1)):  # a P-step, then a Q-step
            nbytes = FLOAT * (sum((rows if side == 0 else cols) * r for rows, cols, r in shapes) + raw)
            link = network.all_reduce(x.link, nbytes, x.n)
            sent = network.ring_all_reduce_bytes(nbytes, x.n)
            steps[step].append(BucketWork(per * numel / 2, link, 0.0, None, per * numel / 2, sent, b[-1]))
    return Plan(steps, vote_s=x.vote_s(), wire="one all-reduce per bucket of P or Q, alternating")


def _doublesqueeze(x: _Ctx, name: str) -> Plan:
    compressor = str(x.opt.get("compressor", "signsgd"))
    comp = _compressor(compressor, x.opt)
    e, d = x.split(compressor)
    placement = "server" if name == "doublesqueeze-async" else str(x.opt.get("placement", "sharded"))
    if placement == "server":
        numel = x.p.numel
        nbytes = comp.payload_nbytes(numel)
        servers = int(x.opt.get("servers", 1))
        link = network.server_round(x.link, nbytes, x.n, servers)
        # Synchronous: a server decodes every worker's part and encodes its reply once. Asynchronous: it
        # applies each push as it comes and answers each worker with an encoding of its own.
        # The servers' work is priced at the speed of a process alone on its cores: on the emulated cluster
        # they share the workers' machine, but work while the workers wait, so the workers' share of the
        # cores (in a profile of copies side by side) is not theirs. A real server is a machine of its own.
        # (Together they cannot run faster than the whole machine: the profile's copies' worth.)
        servers_ = min(servers * x.p.lone_speedup, max(servers, x.p.processes))
        server = (d * numel * x.n + e * numel) / servers_
        busy = 0.0
        # One sender's payload on its own is decoded densely into a fresh tensor (the worker's pull, the
        # asynchronous server's push), not accumulated in place as the aggregate does.
        dense = x.standalone(compressor)[1]
        if name == "doublesqueeze-async":
            # The servers hold the model and its optimizer and serve each push as it comes: a decode, an
            # optimizer step, the change since the worker's copy (a difference), its encode and the copy's
            # update (an add). A worker waits for its own push only, but the servers serve every worker's:
            # the step cannot be shorter than n pushes' work.
            server = (dense * numel + x.p.optimizer_s + x.copy_s(numel, 3) + e * numel) / servers_
            busy = x.n * server
        # A worker's own passes beside the encode (the kernel bench times the sharded hook's fused ones, not
        # these): the velocity of the momentum correction, the compensation and the residual before the
        # push, the decoded result written into the gradients after the pull.
        ex = Exchange(
            e * numel + x.copy_s(numel, 4.5), link, dense * numel + x.copy_s(numel), nbytes, server_s=server
        )
        return Plan(
            exchange=ex,
            wire=f"{compressor} payloads to {servers} server(s) and back, after backward",
            worker_optimizer=name != "doublesqueeze-async",  # async: the servers step, the worker applies
            server_busy_s=busy,
        )
    work = []
    for b in x.buckets:
        numel = x.numel(b)
        nbytes = comp.payload_nbytes(numel)
        a2a = network.all_to_all(x.link, nbytes, x.n)
        gather = network.all_gather(x.link, nbytes / x.n, x.n)
        sent = (x.n - 1) / x.n * nbytes + network.ring_all_gather_bytes(nbytes / x.n, x.n)
        # Own part: decode n workers' parts (n x numel/n) and re-encode it; then decode every part.
        work.append(BucketWork(e * numel, a2a, d * numel + e * numel / x.n, gather, d * numel, sent, b[-1]))
    return Plan([work], vote_s=x.vote_s(), wire=f"{compressor}: all-to-all then all-gather per bucket")


# ------------------------------------------------------------------------------------------ gossip


def _degree(x: _Ctx) -> int:
    from gradzip.comm.topology import make_topology

    topo = make_topology(str(x.opt.get("topology", "ring")), x.n)
    return max(topo.degree(i) for i in range(x.n))


def _gossip(x: _Ctx, name: str) -> Plan:
    """Gossip after the optimizer step. Its local work is counted in passes over the model (a pass: one
    copy's worth of memory traffic) from what the code does, a difference ``a - b`` or an ``add_`` being 1.5,
    and in the fresh model-sized tensors it allocates (each pays its page faults, ``alloc_s_per_element``):

    * ``dpsgd``: a clone and a packed copy per neighbour before; zeros, per neighbour a difference and an
      add, and the final add after; fresh: the clone, a send and a receive buffer per neighbour, the zeros
      and each difference;
    * ``choco``: a difference, the encode and the own decode before; the own add, per neighbour a decode,
      an add, a difference and an add, zeros and the final add after (encode and dense decode as measured
      on their own, ``standalone_s_per_element``); fresh: the difference, the zeros and each difference;
    * ``powergossip``: per neighbour a projection (one read) before; zeros, per neighbour an outer product
      and an add, and the final add after; fresh: the zeros and each outer product.
    """
    deg = _degree(x)
    numel = x.p.numel
    nbytes: float
    if name == "dpsgd":
        nbytes = numel * FLOAT
        before, after = x.copy_s(numel, 1 + deg, 1 + deg), x.copy_s(numel, 2.5 + 3 * deg, 1 + 2 * deg)
    elif name == "choco":
        compressor = str(x.opt.get("compressor", "signsgd"))
        e, d = x.standalone(compressor)
        comp = _compressor(compressor, x.opt)
        # Matrices through the compressor, each its own payload; 1-D tensors raw.
        nbytes = sum(
            comp.payload_nbytes(layer.numel) if len(layer.shape) >= 2 else FLOAT * layer.numel
            for layer in x.p.layers
        )
        before = (e + d) * numel + x.copy_s(numel, 1.5, 1)
        after = d * numel * deg + x.copy_s(numel, 4 + 4.5 * deg, 1 + deg)
    else:  # powergossip: per iteration, one projection per matrix per neighbour, alternating sides; 1-D raw once
        rank = int(x.opt.get("rank", 1))
        its = int(x.opt.get("iterations", 1))
        vec = 0.0
        for layer in x.p.layers:
            if len(layer.shape) >= 2:
                rows = layer.shape[0]
                cols = layer.numel // rows
                vec += its * (rows + cols) / 2 * min(rank, rows, cols)
            else:
                vec += layer.numel
        nbytes = vec * FLOAT
        before = x.copy_s(numel, 0.5 * deg * its)
        after = x.copy_s(numel, (2.5 + 2.5 * deg) * its, (1 + deg) * its)
        link = network.gossip(x.link, nbytes / its, deg, rounds=its)
        return Plan(
            exchange=Exchange(before, link, after, nbytes * deg, after_step=True),
            wire=f"{name}: {deg} neighbour(s), {its} exchange(s) after the optimizer step",
        )
    link = network.gossip(x.link, nbytes, deg)
    return Plan(
        exchange=Exchange(before, link, after, nbytes * deg, after_step=True),
        wire=f"{name}: {deg} neighbour(s), after the optimizer step",
    )


def _floor(x: _Ctx, name: str) -> Plan:
    """The benchmark's floor: DDP with communication switched off (its hook returns the bucket as is)."""
    return Plan([[BucketWork(0.0, 0.0, ready_layer=b[-1]) for b in x.buckets]], wire="nothing")


PLANS: dict[str, Callable[[_Ctx, str], Plan]] = {
    "floor": _floor,
    "ssgd": _allreduce,
    "fp16": _allreduce,
    "signsgd": _allgather,
    "topk": _allgather,
    "randomk": _allreduce,
    "qsgd": _allgather,
    "powersgd": _powersgd,
    "acpsgd": _acpsgd,
    "doublesqueeze": _doublesqueeze,
    "doublesqueeze-async": _doublesqueeze,
    "dpsgd": _gossip,
    "choco": _gossip,
    "powergossip": _gossip,
}


def plan(method: str, profile: ModelProfile, cluster: Cluster, options: dict[str, Any] | None = None) -> Plan:
    """The plan of registry method ``method`` (its options as ``gradzip train`` takes them)."""
    if method not in PLANS:
        raise ValueError(f"unknown method {method!r}; the simulator knows: {', '.join(PLANS)}")
    ctx = _Ctx(profile, cluster, dict(options or {}))
    out = PLANS[method](ctx, method)
    if out.buckets is None:
        return out
    # DDP copies each gradient into its bucket as it becomes ready, and the result back after the step's
    # last collective (gradient_as_bucket_view is off by default): a pass each way over every bucket.
    steps = [
        [
            dataclasses.replace(w, copy_s=ctx.copy_s(ctx.numel(b)))
            for w, b in zip(step, ctx.buckets, strict=True)
        ]
        for step in out.buckets
    ]
    return dataclasses.replace(out, buckets=steps)
