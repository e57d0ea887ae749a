"""The link as each of gloo's collectives sees it: a few sizes of each kind on the cluster, each fitted by
least squares to its model ``t = m·alpha + c·S/beta`` (:mod:`gradzip.sim.network` gives ``m`` and ``c``):

* ``all_reduce``: ``m = 2(n-1)``, ``c = 2(n-1)/n`` (S: the tensor);
* ``all_gather``: ``m = n-1``, ``c = n-1`` (S: one worker's payload);
* ``all_to_all``: ``m = n-1``, ``c = (n-1)/n`` (S: one worker's whole message);
* ``exchange``: ring neighbours (``d`` of them) swap ``S`` bytes each way, as gossip does: ``m = d``, ``c = d``.

The kinds differ on gloo: measured on the emulated cluster, its all-gather and the point-to-point exchange
move bytes markedly slower than its ring all-reduce, which is why one alpha and beta cannot serve them all.

``python -m gradzip.sim.calibrate OUT`` runs as one worker of a world (rank and rendezvous from the
environment, as torchrun sets them); rank 0 writes ``{"workers": n, "kinds": {kind: {"sizes", "seconds"}}}``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import timedelta

SIZES = (1 << 10, 1 << 16, 1 << 20, 1 << 22)
"""Bytes per call: from latency-bound to bandwidth-bound."""
EXCHANGE_SIZES = (*SIZES, 1 << 24)
"""The exchange's go up to 16 MB: below a few MB the sockets' buffers let a pair's two directions overlap,
which gossip's model-sized messages do not get."""
REPEATS = 5
KINDS = ("all_reduce", "all_gather", "all_to_all", "exchange")


def coefficients(kind: str, n: int) -> tuple[float, float]:
    """``(m, c)`` of ``kind``'s model ``t = m·alpha + c·S/beta`` on ``n`` workers (ring: degree 2, or 1 for
    two workers)."""
    degree = 1 if n == 2 else 2
    return {
        "all_reduce": (2 * (n - 1), 2 * (n - 1) / n),
        "all_gather": (n - 1, n - 1),
        "all_to_all": (n - 1, (n - 1) / n),
        "exchange": (degree, degree),
    }[kind]


def fit(sizes: list[float], seconds: list[float], n: int, kind: str = "all_reduce") -> tuple[float, float]:
    """(alpha seconds per message, beta payload bytes per second) of ``kind``'s model through the points."""
    m, c = coefficients(kind, n)
    k = len(sizes)
    mx, my = sum(sizes) / k, sum(seconds) / k
    sxx = sum((s - mx) ** 2 for s in sizes)
    slope = sum((s - mx) * (t - my) for s, t in zip(sizes, seconds, strict=True)) / sxx if sxx else 0.0
    slope = max(slope, 1e-15)
    intercept = max(0.0, my - slope * mx)
    return intercept / m, c / slope


def main(argv: list[str]) -> int:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    rank, n = dist.get_rank(), dist.get_world_size()
    peers = sorted({(rank + 1) % n, (rank - 1) % n} - {rank})

    def call(kind: str, size: int) -> Callable[[], None]:
        t = torch.ones(size // 4)
        if kind == "all_reduce":
            return lambda: dist.all_reduce(t)
        if kind == "all_gather":
            out = torch.empty(n * t.numel())
            return lambda: dist.all_gather_into_tensor(out, t)
        if kind == "all_to_all":
            t = torch.ones(n * max(1, size // 4 // n))
            out = torch.empty_like(t)
            return lambda: dist.all_to_all_single(out, t)
        recv = {p: torch.empty_like(t) for p in peers}

        def exchange() -> None:
            ops = [
                op for p in peers for op in (dist.P2POp(dist.isend, t, p), dist.P2POp(dist.irecv, recv[p], p))
            ]
            for work in dist.batch_isend_irecv(ops):
                work.wait()

        return exchange

    try:
        out: dict[str, dict[str, list[float]]] = {}
        for kind in KINDS:
            seconds = []
            sizes = EXCHANGE_SIZES if kind == "exchange" else SIZES
            for size in sizes:
                run = call(kind, size)
                run()
                times = []
                for _ in range(REPEATS):
                    dist.barrier()
                    start = time.perf_counter()
                    run()
                    times.append(time.perf_counter() - start)
                # Every worker's time: the collective ends when the slowest one is done.
                everyone: list[object] = [None] * n
                dist.all_gather_object(everyone, statistics.median(times))
                seconds.append(max(float(x) for x in everyone))  # type: ignore[arg-type]
            out[kind] = {"sizes": [float(s) for s in sizes], "seconds": seconds}
        if rank == 0:
            with open(argv[0], "w") as f:
                json.dump({"workers": n, "kinds": out}, f)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    os._exit(code)
