"""One worker of one benchmark configuration, run in a fresh process (inside its network namespace when the
network is emulated): ``python -m gradzip.bench.worker SPEC_JSON OUT_PATH``, rank and rendezvous from the
environment as torchrun sets them.

It trains with the same loop as ``gradzip train`` (``gradzip.train.loop.run_steps``) on one synthetic batch,
and reports the loop's timing in parts: forward+backward, compression, communication wait and the optimizer.
A gradzip hook reports how long it computed and how long it was blocked on collectives, which splits backward
into compute, compression and communication wait; the parameter-server and gossip exchanges are timed where
they run, after backward and after the optimizer.

Over the measured iterations only (after the warm-up, before the results' exchange), it also reads its link's
counters where it has a link of its own (``gradzip.bench.wire``), and beside them states the model of the
same traffic from the collectives its method counted.
"""

# No `from __future__ import annotations`: DDP checks the floor hook's annotations as real objects.
import dataclasses
import itertools
import json
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from gradzip.bench import wire
from gradzip.comm.collectives import CommStats, workers_group
from gradzip.integrations.paramserver import serve
from gradzip.registry import family, make_config, servers_needed
from gradzip.train.env import threads_per_worker, usable_cores
from gradzip.train.exchange import Exchange, HookExchange, Settings, build_exchange
from gradzip.train.loop import run_steps
from gradzip.train.models import build_model
from gradzip.train.records import StepRecord

# Not registry methods, but measured beside them: the floor has communication switched off (no method can
# beat it), and torch-powersgd is torch's own powerSGD_hook at the same rank.
RIVALS = ("floor", "torch-powersgd")

# A small learning rate: the benchmark measures time, and should not diverge on random data.
LR, MOMENTUM = 1e-4, 0.9


@dataclass
class Measurement:
    """How every configuration of a grid is measured (the settings that are not axes of the grid)."""

    latency: str = "0ms"
    """One-way delay added to each emulated link."""
    warmup: int = 3
    """Iterations before measuring."""
    iters: int = 10
    """Measured iterations."""
    image_size: int = 32
    seq_len: int = 32
    timeout: float = 300.0
    """Seconds a configuration may take."""
    device: str = "cpu"
    """``cuda``: each worker trains on GPU ``LOCAL_RANK % device_count`` (gloo carries CUDA tensors)."""


@dataclass
class BenchSpec(Measurement):
    """One configuration: a model, a method and a cluster shape, measured in fresh processes."""

    model: str = "wide_mlp"
    method: str = "ssgd"
    options: dict[str, Any] = field(default_factory=dict)
    workers: int = 4
    bandwidth: str = "1gbit"
    batch_size: int = 32
    bucket_cap_mb: float = 25.0
    seed: int = 0
    round: int = 0
    """Which repetition of the grid this is (``--rounds``): references come from the same round."""

    def servers(self) -> int:
        """Dedicated parameter-server processes beside the workers (DoubleSqueeze's server placements)."""
        if self.method in RIVALS:
            return 0
        return servers_needed(self.method, make_config(self.method, **self.options).to_dict())

    def processes(self) -> int:
        return self.workers + self.servers()

    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return (
            f"{self.model} {self.method}{'(' + opts + ')' if opts else ''} x{self.workers} @{self.bandwidth}"
            + (f" round {self.round}" if self.round else "")
        )


def synthetic_batch(spec: BenchSpec) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """This worker's random batch of ``spec``'s model (:func:`random_batch`), seeded by its rank."""
    seed = spec.seed + 1 + int(os.environ.get("RANK", "0"))
    return random_batch(spec.model, spec.batch_size, spec.image_size, spec.seq_len, seed)


def random_batch(
    model: str, batch_size: int, image_size: int, seq_len: int, seed: int, num_classes: int = 10
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Random inputs of the model's kind (token ids for BERT, images of ``image_size`` otherwise), labels,
    and the input shape without the batch dimension."""
    g = torch.Generator().manual_seed(seed)
    if model.startswith("bert"):
        shape: tuple[int, ...] = (seq_len,)
        x = torch.randint(0, 30522, (batch_size, seq_len), generator=g)
    else:
        shape = (3, image_size, image_size)
        x = torch.randn(batch_size, *shape, generator=g)
    return x, torch.randint(0, num_classes, (batch_size,), generator=g), shape


def _floor_hook(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Communication switched off: every worker keeps its own gradient."""
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def _rival(spec: BenchSpec) -> Callable[[DDP], None]:
    """Registers a rival's hook (its work is not gradzip's, so it goes unmeasured)."""

    def register(model: DDP) -> None:
        if spec.method == "floor":
            model.register_comm_hook(None, _floor_hook)
            return
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_psgd

        psgd = torch_psgd.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=int(spec.options.get("rank", 4)),
            start_powerSGD_iter=2,  # torch's minimum with error feedback; our warm-up iterations cover it
            min_compression_rate=2,
        )
        model.register_comm_hook(psgd, torch_psgd.powerSGD_hook)

    return register


def exchange(
    spec: BenchSpec, model: torch.nn.Module, device: torch.device, group: dist.ProcessGroup | None
) -> Exchange:
    """The configuration's exchange: a rival's hook, or the method's own family as ``gradzip train`` runs it."""
    if spec.method in RIVALS:
        # torch's powerSGD_hook only runs on gloo with a single bucket (see BENCHMARKS.md): give it one.
        cap = 1e6 if spec.method == "torch-powersgd" else spec.bucket_cap_mb
        return HookExchange(model, device, Settings(spec.method, {}, LR, MOMENTUM, cap), _rival(spec))
    options = dict(spec.options)
    if family(spec.method, options) == "gossip":
        options["metrics"] = (
            False  # the consensus metric is a collective outside the method, as in production
        )
    run = Settings(spec.method, options, LR, MOMENTUM, spec.bucket_cap_mb, spec.timeout)
    return build_exchange(model, device, run, group)


def run(spec: BenchSpec) -> dict[str, Any] | None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # The processes on this host share its cores: one share each avoids oversubscription (on the emulated
    # cluster every process is on this machine; under torchrun, LOCAL_WORLD_SIZE of them are).
    torch.set_num_threads(threads_per_worker())
    dist.init_process_group("gloo", timeout=timedelta(seconds=spec.timeout))
    try:
        if not spec.servers():
            return _measure(spec, rank, world, None)
        # The last ranks serve until every worker has closed; the workers' results travel on their own group.
        group = workers_group(spec.workers, timedelta(seconds=spec.timeout))
        if rank >= spec.workers:
            serve()
            return None
        return _measure(spec, rank, spec.workers, group)
    finally:
        dist.destroy_process_group()


def _measure(
    spec: BenchSpec, rank: int, world: int, group: dist.ProcessGroup | None
) -> dict[str, Any] | None:
    device = torch.device("cpu")
    if spec.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    x, y, input_shape = synthetic_batch(spec)
    x, y = x.to(device), y.to(device)
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, input_shape, 10).to(device)
    ex = exchange(spec, model, device, group)
    link = wire.link_from_env()
    result = run_steps(ex, itertools.repeat((x, y), spec.warmup), device)
    # The measured window: these readings cost no collective and well under a millisecond, so they neither
    # add traffic nor hold the other workers up.
    stats_before = ex.stats.to_dict() if ex.stats is not None else None
    link_before = wire.read_link(link) if link else None
    result = run_steps(ex, itertools.repeat((x, y), spec.iters), device, result=result)
    link_after = wire.read_link(link) if link else None
    mine = _traffic(spec, world, ex.stats, stats_before, link_before, link_after)
    ex.close()  # the servers return once every worker has closed
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, (result.records[spec.warmup :], mine), group=group)
    if rank != 0:
        return None
    return summarize(spec, [r for r, _ in everyone], [w for _, w in everyone])


def _traffic(
    spec: BenchSpec,
    world: int,
    stats: CommStats | None,
    stats_before: dict[str, int] | None,
    link_before: wire.LinkCounters | None,
    link_after: wire.LinkCounters | None,
) -> dict[str, Any]:
    """This worker's measured and modelled wire bytes per measured step, and what it may run on: ``sent``
    and ``received`` (None without a link of its own), ``model_sent``, ``model_received`` and ``payload``
    (None without gradzip's counters), ``threads`` (torch's intra-op threads), ``cores`` (the cores this
    process may run on) and ``processes_on_host`` (``LOCAL_WORLD_SIZE``, None when not set)."""
    out: dict[str, Any] = dict.fromkeys(("sent", "received", "model_sent", "model_received", "payload"))
    steps = max(1, spec.iters)
    if link_before is not None and link_after is not None:
        sent, received = wire.wire_bytes(link_before, link_after)
        out.update(sent=sent / steps, received=received / steps)
    if stats is not None and stats_before is not None:
        modelled = wire.model(wire.stats_between(stats_before, stats), world, steps)
        out.update(
            model_sent=modelled["sent"], model_received=modelled["received"], payload=modelled["payload"]
        )
    local = os.environ.get("LOCAL_WORLD_SIZE")
    out.update(
        threads=torch.get_num_threads(),
        cores=usable_cores(),
        processes_on_host=int(local) if local and local.isdigit() else None,
    )
    return out


def summarize(
    spec: BenchSpec, per_rank: list[list[StepRecord]], traffic: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """An iteration lasts as long as its slowest worker; parts and bytes are averaged over workers.

    ``traffic`` is each worker's ``_traffic``: its wire bytes become the result's ``wire_*``,
    ``model_wire_*`` and ``ring_bytes_per_step`` fields (per worker per step, means over workers; None where
    not available), and its CPU facts the ``cpu`` field: ``{"threads": [...], "cores": [...],
    "processes_on_host": [...]}``, one entry per worker, with the machine's ``machine_cores``."""
    iters = [max(r[i].time for r in per_rank) for i in range(len(per_rank[0]))]
    med = statistics.median(iters)

    def part(name: str) -> float | None:
        if getattr(per_rank[0][0], name) is None:
            return None
        return statistics.mean(statistics.median(getattr(row, name) for row in r) for r in per_rank)

    # "compute" (forward+backward without a hook's own work) is formed per iteration by the loop: a
    # difference of medians could go negative, the median of differences cannot.
    parts = {name: part(name) for name in ("compute", "optimizer", "compress", "wait")}
    compress, wait = parts["compress"], parts["wait"]
    out: dict[str, Any] = {
        "spec": dataclasses.asdict(spec),
        "iteration_s": iters,
        "median_s": med,
        "p10_s": _quantile(iters, 0.1),
        "p90_s": _quantile(iters, 0.9),
        "samples_per_s": spec.workers * spec.batch_size / med,
        "forward_backward_s": parts["compute"],
        "compress_s": compress,
        "wait_s": wait,
        "optimizer_s": parts["optimizer"],
        "bytes_sent_per_step": part("bytes_sent"),
        "bytes_received_per_step": part("bytes_received"),
        **wire.summary(traffic or []),
        "cpu": {
            "threads": [t.get("threads") for t in traffic or []],
            "cores": [t.get("cores") for t in traffic or []],
            "processes_on_host": [t.get("processes_on_host") for t in traffic or []],
            "machine_cores": os.cpu_count(),
        },
    }
    if spec.method == "torch-powersgd":
        out["note"] = "torch powerSGD_hook: one DDP bucket (it fails on gloo with more); no byte counters"
    return out


def _quantile(values: list[float], q: float) -> float:
    """The q-quantile with linear interpolation (q=0.5 is the median)."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    spec = BenchSpec(**json.loads(args[0]))
    result = run(spec)
    if result is not None:
        with open(args[1], "w") as f:
            json.dump(result, f)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter finalization: gloo's worker threads may still hold work objects whose tensors, freed
    # while Python is being torn down, abort the process ("terminate called without an active exception",
    # pytorch#190489; seen here once in 15 configurations). Everything is written and the group destroyed.
    os._exit(code)
