"""One worker of one benchmark configuration, run in a fresh process (inside its network namespace when the
network is emulated): ``python -m gradzip.bench.worker SPEC_JSON OUT_PATH``, rank and rendezvous from the
environment as torchrun sets them.

Each iteration is timed in parts: forward+backward (which runs the hooks and waits for communication), the
optimizer, and for the decentralized methods the gossip after it. The gradzip hooks also report how long they computed and how long they were blocked on
collectives, which splits backward into compute, compression and communication wait.
"""

# No `from __future__ import annotations`: DDP checks the floor hook's annotations as real objects.
import dataclasses
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

# Not registry methods, but measured beside them: the floor has communication switched off (no method can
# beat it), and torch-powersgd is torch's own powerSGD_hook at the same rank.
RIVALS = ("floor", "torch-powersgd")

# A small learning rate: the benchmark measures time, and should not diverge on random data.
LR, MOMENTUM = 1e-4, 0.9


@dataclass
class BenchSpec:
    """One configuration: a model, a method and a cluster shape, measured in fresh processes."""

    model: str = "wide_mlp"
    method: str = "ssgd"
    options: dict[str, Any] = field(default_factory=dict)
    workers: int = 4
    bandwidth: str = "1gbit"
    latency: str = "0ms"
    batch_size: int = 32
    warmup: int = 3
    iters: int = 10
    bucket_cap_mb: float = 25.0
    image_size: int = 32
    seq_len: int = 32
    seed: int = 0
    timeout: float = 300.0
    round: int = 0
    """Which repetition of the grid this is (``--rounds``): references come from the same round."""
    device: str = "cpu"
    """``cuda``: each worker trains on GPU ``LOCAL_RANK % device_count`` (gloo carries CUDA tensors)."""

    def servers(self) -> int:
        """Dedicated parameter-server processes beside the workers (DoubleSqueeze's server placements)."""
        if self.method in RIVALS:
            return 0
        from gradzip.registry import make_config
        from gradzip.train.paramserver import server_count

        return server_count(self.method, make_config(self.method, **self.options).to_dict())

    def processes(self) -> int:
        return self.workers + self.servers()

    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return (
            f"{self.model} {self.method}{'(' + opts + ')' if opts else ''} x{self.workers} @{self.bandwidth}"
            + (f" round {self.round}" if self.round else "")
        )


def synthetic_batch(spec: BenchSpec) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Random inputs of the model's kind: token ids for BERT, images of ``image_size`` otherwise."""
    g = torch.Generator().manual_seed(spec.seed + 1 + int(os.environ.get("RANK", "0")))
    if spec.model.startswith("bert"):
        shape: tuple[int, ...] = (spec.seq_len,)
        x = torch.randint(0, 30522, (spec.batch_size, spec.seq_len), generator=g)
    else:
        shape = (3, spec.image_size, spec.image_size)
        x = torch.randn(spec.batch_size, *shape, generator=g)
    return x, torch.randint(0, 10, (spec.batch_size,), generator=g), shape


def _floor_hook(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Communication switched off: every worker keeps its own gradient."""
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def attach(model: DDP, spec: BenchSpec) -> Any:
    """Register the configuration's hook; returns gradzip's HookState, or None for the rivals."""
    if spec.method == "floor":
        model.register_comm_hook(None, _floor_hook)
        return None
    if spec.method == "torch-powersgd":
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_psgd

        psgd = torch_psgd.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=int(spec.options.get("rank", 4)),
            start_powerSGD_iter=2,  # torch's minimum with error feedback; our warm-up iterations cover it
            min_compression_rate=2,
        )
        model.register_comm_hook(psgd, torch_psgd.powerSGD_hook)
        return None
    import gradzip

    state, hook = gradzip.ddp_hook(spec.method, model=model, **spec.options)
    model.register_comm_hook(state, hook)
    return state


def run(spec: BenchSpec) -> dict[str, Any] | None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # The processes on this host share its cores: one share each avoids oversubscription (on the emulated
    # cluster every process is on this machine; under torchrun, LOCAL_WORLD_SIZE of them are).
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    dist.init_process_group("gloo", timeout=timedelta(seconds=spec.timeout))
    try:
        if not spec.servers():
            return _measure(spec, rank, world, None)
        # The last ranks serve until every worker has closed; the workers' results travel on their own group.
        group = dist.new_group(list(range(spec.workers)))
        if rank >= spec.workers:
            from gradzip.comm.paramserver import serve

            serve()
            return None
        return _measure(spec, rank, spec.workers, group)
    finally:
        dist.destroy_process_group()


class _Gossiping:
    """A decentralized method in the benchmark's loop: no DDP; the gossip runs after the optimizer step."""

    def __init__(self, model: nn.Module, spec: BenchSpec) -> None:
        from gradzip.gossip.config import build_gossip
        from gradzip.registry import make_config

        # The consensus metric is a collective outside the method: off, as in a production run.
        cfg = make_config(spec.method, **{**spec.options, "metrics": False})
        self.gossip = build_gossip(spec.method, model, cfg, timeout=timedelta(seconds=spec.timeout))
        self.seconds = 0.0

    def counters(self) -> tuple[float, float, int, int]:
        """Seconds in the gossip so far, seconds of it blocked on neighbours, bytes sent and received."""
        return (
            self.seconds,
            self.gossip.comm.wait_s,
            self.gossip.stats.bytes_sent,
            self.gossip.stats.bytes_received,
        )

    def step(self) -> None:
        start = time.perf_counter()
        self.gossip.step()
        self.seconds += time.perf_counter() - start


class _Serving:
    """DoubleSqueeze through dedicated servers: no DDP; the push and the reply follow backward. The
    asynchronous variant's servers run the optimizer, so its workers have none."""

    def __init__(self, model: nn.Module, spec: BenchSpec) -> None:
        from gradzip.comm.paramserver import PSWorker
        from gradzip.registry import get_spec

        self.asynchronous = get_spec(spec.method).kind == "server"
        options = {k: v for k, v in spec.options.items() if k not in ("servers", "placement")}
        extra: dict[str, Any] = {"lr": LR, "momentum": MOMENTUM} if self.asynchronous else {}
        self.ps = PSWorker(
            model, spec.method, servers=spec.servers(), timeout=spec.timeout, **extra, **options
        )
        self.seconds = 0.0

    def counters(self) -> tuple[float, float, int, int]:
        """Seconds in the exchange so far, seconds of it blocked on servers, bytes sent and received."""
        return self.seconds, self.ps.wait_s, self.ps.stats.bytes_sent, self.ps.stats.bytes_received

    def step(self) -> None:
        start = time.perf_counter()
        self.ps.step()
        self.seconds += time.perf_counter() - start


def _measure(
    spec: BenchSpec, rank: int, world: int, group: dist.ProcessGroup | None
) -> dict[str, Any] | None:
    from gradzip.registry import get_spec
    from gradzip.train.models import build_model

    device = torch.device("cpu")
    if spec.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    x, y, input_shape = synthetic_batch(spec)
    x, y = x.to(device), y.to(device)
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, input_shape, 10).to(device)
    kind = "hook" if spec.method in RIVALS else get_spec(spec.method).kind
    module: nn.Module = model
    state, gossip, serving = None, None, None
    if kind == "gossip":
        gossip = _Gossiping(model, spec)
    elif spec.servers():
        serving = _Serving(model, spec)
    else:
        # torch's powerSGD_hook only runs on gloo with a single bucket (see BENCHMARKS.md): give it one.
        cap = 1e6 if spec.method == "torch-powersgd" else spec.bucket_cap_mb
        module = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, bucket_cap_mb=cap)
        state = attach(module, spec)

    def counters() -> tuple[float, float, int, int] | None:
        """Time in gradzip's communication code, time of it blocked, bytes sent and received, so far."""
        if gossip is not None:
            return gossip.counters()
        if serving is not None:
            return serving.counters()
        if state is None:
            return None
        return state.hook_s, state.reducer.wait_s, state.stats.bytes_sent, state.stats.bytes_received

    opt = torch.optim.SGD(module.parameters(), lr=LR, momentum=MOMENTUM)

    def now() -> float:
        """The time once the GPU has finished what was queued (kernels run asynchronously)."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    rows = []
    for it in range(spec.warmup + spec.iters):
        before = counters()
        t0 = now()
        opt.zero_grad(set_to_none=False)
        loss = nn.functional.cross_entropy(module(x), y)
        loss.backward()
        t2 = now()
        if serving is not None:
            serving.step()  # replaces the gradients (synchronous) or the parameters (asynchronous)
        t_exchanged = now()
        if serving is None or not serving.asynchronous:
            opt.step()
        t3 = now()
        if gossip is not None:
            gossip.step()  # adapt, then combine with the neighbours (D-PSGD's order)
        t4 = now()
        if it < spec.warmup:
            continue
        row = {"iteration": t4 - t0, "compute": t2 - t0, "optimizer": t3 - t_exchanged}
        after = counters()
        if before is not None and after is not None:
            spent, blocked = after[0] - before[0], after[1] - before[1]
            row.update(
                compress=spent - blocked,
                wait=blocked,
                bytes_sent=after[2] - before[2],
                bytes_received=after[3] - before[3],
            )
            if state is not None:  # a hook runs inside backward: forward+backward without the hook's work
                row["compute"] -= spent
        rows.append(row)
    if serving is not None:
        serving.ps.close()  # the servers return once every worker has closed
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, rows, group=group)
    if rank != 0:
        return None
    return summarize(spec, everyone)


def summarize(spec: BenchSpec, per_rank: list[list[dict[str, float]]]) -> dict[str, Any]:
    """An iteration lasts as long as its slowest worker; parts and bytes are averaged over workers."""
    iters = [max(r[i]["iteration"] for r in per_rank) for i in range(len(per_rank[0]))]
    med = statistics.median(iters)

    def part(name: str) -> float | None:
        if name not in per_rank[0][0]:
            return None
        return statistics.mean(statistics.median(row[name] for row in r) for r in per_rank)

    # "compute" (forward+backward without a hook's own work) is formed per iteration: a difference of
    # medians could go negative, the median of differences cannot.
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
