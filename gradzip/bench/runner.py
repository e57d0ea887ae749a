"""``gradzip bench``: which method is actually faster than well-optimized S-SGD, where, and why.

A grid of configurations (model x method x workers x bandwidth x batch x rank x bucket size), each measured
in fresh worker processes on an emulated cluster: one network namespace per worker, linked by rate-limited
veth pairs (``gradzip.bench.cluster``). Every (model, cluster, batch) group also measures the floor
(communication switched off) and ``ssgd``, so each method's speed-up and distance to the floor come from the
same run.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradzip.bench.wire import LINK_ENV
from gradzip.bench.worker import RIVALS, BenchSpec, Measurement
from gradzip.registry import get_spec, make_config
from gradzip.registry import methods as registry_methods
from gradzip.train.models import MODELS
from gradzip.util import free_port, last_line, write_atomic

LOW_RANK = ("powersgd", "acpsgd", "torch-powersgd")
DEFAULT_METHODS = ["floor", "ssgd", "signsgd", "topk", "powersgd", "torch-powersgd", "acpsgd"]


def valid_methods() -> list[str]:
    return [*RIVALS, *registry_methods()]


def parse_method(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME[:KEY=VALUE...]`` -> (name, options), e.g. ``doublesqueeze:placement=server:compressor=topk``;
    the options are checked against the method's config (a bad one raises ValueError naming it)."""
    name, *pairs = text.split(":")
    valid = valid_methods()
    if name not in valid:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(valid)}")
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"method option {pair!r} in {text!r} is invalid: write NAME:KEY=VALUE")
        options[key.replace("-", "_")] = _option_value(value)
    if name in RIVALS:
        if set(options) - {"rank"}:
            raise ValueError(f"{name} takes no options but rank; got {', '.join(options)}")
    else:
        make_config(name, **options)
    return name, options


def _option_value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


@dataclass
class Grid(Measurement):
    """What to sweep. Every list is one axis of the grid; the rest is how each configuration is measured."""

    models: list[str] = field(default_factory=lambda: ["wide_mlp"])
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    workers: list[int] = field(default_factory=lambda: [4])
    bandwidths: list[str] = field(default_factory=lambda: ["1gbit", "unlimited"])
    batch_sizes: list[int] = field(default_factory=lambda: [32])
    ranks: list[int] = field(default_factory=lambda: [4])
    bucket_caps_mb: list[float] = field(default_factory=lambda: [25.0])
    rounds: int = 1

    def __post_init__(self) -> None:
        for m in self.methods:
            parse_method(m)
        for model in self.models:
            if model not in MODELS:
                raise ValueError(f"unknown model {model!r}; valid models: {', '.join(sorted(MODELS))}")
        if self.iters < 1:
            raise ValueError(f"iters={self.iters} is invalid: at least 1 measured iteration")
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"rounds={self.rounds!r} is invalid: at least 1 round")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r} is invalid: use cpu or cuda")
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ValueError("device='cuda' requested but CUDA is not available")
            for text in self.methods:
                name, _ = parse_method(text)
                if name not in RIVALS and (get_spec(name).kind != "hook" or "placement=server" in text):
                    raise ValueError(
                        f"method {text!r} does not run on cuda in the benchmark (gossip and parameter servers "
                        "exchange CPU tensors): use --device cpu"
                    )
        for name in ("workers", "batch_sizes", "ranks"):
            for v in getattr(self, name):
                if not isinstance(v, int) or v < 1:
                    raise ValueError(f"{name} value {v!r} is invalid: must be an integer >= 1")
        if any(w < 2 for w in self.workers):
            raise ValueError(f"workers={self.workers} is invalid: a distributed benchmark needs >= 2 workers")
        if self.warmup < 3 and "torch-powersgd" in self.methods:
            # torch's hook compresses from its 2nd iteration on: measure only compressed iterations.
            raise ValueError(f"warmup={self.warmup} is invalid with torch-powersgd: it must be >= 3")

    def specs(self) -> list[BenchSpec]:
        """Every configuration, the floor and ssgd of each group first (the references)."""
        out = []
        axes = itertools.product(
            self.models, self.workers, self.bandwidths, self.batch_sizes, self.bucket_caps_mb
        )
        # Rounds inside each group: a drift of the machine's speed then touches every method of a round.
        for (model, workers, bandwidth, batch, cap), rnd in itertools.product(axes, range(self.rounds)):
            for text in sorted(self.methods, key=lambda m: (m not in ("floor", "ssgd"), m != "floor")):
                method, given = parse_method(text)
                ranks = self.ranks if method in LOW_RANK and "rank" not in given else [None]
                for rank in ranks:
                    options = {**given, "rank": rank} if rank is not None else given
                    out.append(
                        BenchSpec(
                            **self.measurement(),
                            model=model,
                            method=method,
                            options=options,
                            workers=workers,
                            bandwidth=bandwidth,
                            batch_size=batch,
                            bucket_cap_mb=cap,
                            round=rnd,
                        )  # fmt: skip
                    )
        return out

    def measurement(self) -> dict[str, Any]:
        """This grid's settings that every configuration shares."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(Measurement)}


def group_key(spec: dict[str, Any]) -> tuple[Any, ...]:
    """Configurations that differ only in method (and its options) are compared with each other."""
    return (
        spec["model"], spec["workers"], spec["bandwidth"], spec["latency"], spec["batch_size"],
        spec["bucket_cap_mb"], spec["image_size"], spec["seq_len"], spec.get("round", 0),
    )  # fmt: skip


def add_references(results: list[dict[str, Any]]) -> None:
    """Speed-up over ssgd and distance to the floor, from the same group of the same run.

    No method can beat the floor (the same work with communication switched off). A method whose p90 is
    below the floor's p10 did, beyond the spread of both: then the group's timings do not measure the
    methods, and every row of the group gets ``"unreliable": "<reason and likely cause>"`` (the table prints
    no ratio for it). Recomputed from scratch on every call, as results arrive."""
    refs: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for r in results:
        if "median_s" in r and r["spec"]["method"] in ("floor", "ssgd"):
            refs.setdefault(group_key(r["spec"]), {})[r["spec"]["method"]] = r
    for r in results:
        r.pop("unreliable", None)
        if "median_s" not in r:
            continue
        ref = refs.get(group_key(r["spec"]), {})
        r["speedup_vs_ssgd"] = ref["ssgd"]["median_s"] / r["median_s"] if "ssgd" in ref else None
        r["vs_floor"] = r["median_s"] / ref["floor"]["median_s"] if "floor" in ref else None
    for key, ref in refs.items():
        floor = ref.get("floor")
        if floor is None:
            continue
        group = [r for r in results if "median_s" in r and group_key(r["spec"]) == key]
        beaten = [r for r in group if r is not floor and _p(r, "p90_s") < _p(floor, "p10_s")]
        if beaten:
            fastest = min(beaten, key=lambda r: _p(r, "p90_s"))
            reason = unreliable_reason(fastest, floor)
            for r in group:
                r["unreliable"] = reason


def _p(result: dict[str, Any], key: str) -> float:
    value = result.get(key)
    return float(result["median_s"] if value is None else value)


def unreliable_reason(fast: dict[str, Any], floor: dict[str, Any]) -> str:
    """Why a group whose ``fast`` row beat its ``floor`` row is not comparable, with the likely cause: the
    threads per worker against the cores it may use and the processes on its host (the result's ``cpu``)."""
    spec = fast["spec"]
    opts = ",".join(f"{k}={v}" for k, v in sorted(spec.get("options", {}).items()))
    name = spec["method"] + (f" ({opts})" if opts else "")
    what = (
        f"{name} beat the floor beyond the spread (p90 {1000 * _p(fast, 'p90_s'):.0f} ms < the floor's p10 "
        f"{1000 * _p(floor, 'p10_s'):.0f} ms), which no method can do: this group's times are not comparable"
    )
    cpu = floor.get("cpu") or fast.get("cpu") or {}
    threads = max((t for t in cpu.get("threads", []) if t), default=None)
    cores = min((c for c in cpu.get("cores", []) if c), default=None)
    local = max((p for p in cpu.get("processes_on_host", []) if p), default=None)
    if threads is None or cores is None:
        return f"{what}; likely cause: CPU contention (threads per worker and cores not recorded)"
    busy = threads * (local or 1)
    facts = (
        f"{threads} thread(s) per worker, {cores} usable core(s), "
        + (f"{local} process(es) per host" if local else "processes per host unknown")
        + (f", {cpu['machine_cores']} core(s) on this machine" if cpu.get("machine_cores") else "")
    )
    if busy > cores:
        cause = (
            f"the processes sharing a host run {busy} busy threads on {cores} cores, which preempt each other"
        )
    else:
        cause = (
            "the workers' threads fit their hosts' cores, so the hosts likely share cores (emulated hosts on "
            "one machine, or a busy machine): while the floor computes on every host at once the cores are "
            "oversubscribed, and a method that waits on the network leaves its cores to the others"
        )
    return f"{what}; likely cause: {cause} ({facts})"


def run_in_cluster(cluster: Any, workers: int, argv: list[str], timeout: float, log_dir: Path) -> str | None:
    """``argv`` as ``workers`` processes, rank r on host r of ``cluster``, with torchrun's environment.

    Returns None when every process succeeded, else a one-line reason naming the failed rank."""
    # Loopback when the workers share the root namespace; inside namespaces any port is free in host 0's.
    port = free_port() if cluster.hosts[0].netns is None else random.randint(20000, 60000)
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    timed_out = False
    failed: int | None = None
    try:
        for rank in range(workers):
            namespaced = cluster.hosts[rank].netns is not None
            env = dict(
                {k: v for k, v in os.environ.items() if k != LINK_ENV},
                RANK=str(rank),
                WORLD_SIZE=str(workers),
                LOCAL_RANK=str(rank),
                LOCAL_WORLD_SIZE=str(workers),
                MASTER_ADDR=cluster.hosts[0].address,
                MASTER_PORT=str(port),
                OMP_NUM_THREADS="1",
                # Always set, never inherited: gloo must use the emulated link inside a namespace and
                # loopback outside one. Left to choose, it may bind the machine's own network interface,
                # and no traffic of ours may leave our namespaces.
                GLOO_SOCKET_IFNAME="eth0" if namespaced else "lo",
            )
            if namespaced:  # the worker's own link, whose counters are its traffic alone (bench.wire)
                env[LINK_ENV] = "eth0"
            log = open(log_dir / f"rank{rank}-{port}.log", "w+")  # noqa: SIM115 (closed below)
            logs.append(log)
            procs.append(
                subprocess.Popen(cluster.command(rank, argv), env=env, stdout=log, stderr=subprocess.STDOUT)
            )
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            failed = next((r for r, p in enumerate(procs) if p.poll() not in (None, 0)), None)
            if failed is not None:
                break
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    if failed is None and not timed_out:
        failed = next((r for r, p in enumerate(procs) if p.returncode != 0), None)
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    if failed is None and not timed_out:
        return None
    reason = f"timed out after {timeout:.0f} s" if timed_out else f"rank {failed} failed"
    return f"{reason}: {last_line(texts[failed or 0]) or 'no output'}"


def run_spec(spec: BenchSpec, cluster: Any, log_dir: Path) -> dict[str, Any]:
    """One configuration in fresh processes, one per host of ``cluster``; a failure is recorded, not raised."""
    out = log_dir / f"result-{time.monotonic_ns()}.json"
    argv = [sys.executable, "-m", "gradzip.bench.worker", json.dumps(dataclasses.asdict(spec)), str(out)]
    error = run_in_cluster(cluster, spec.processes(), argv, spec.timeout + 60, log_dir)
    if error is None and out.exists():
        result: dict[str, Any] = json.loads(out.read_text())
        return result
    return {"spec": dataclasses.asdict(spec), "error": error or "no result written"}


def run_grid(
    grid: Grid,
    out_dir: Path,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run every configuration; results are saved after each one, so an interrupted run loses nothing."""
    from gradzip.bench.cluster import EmulatedCluster
    from gradzip.bench.network import check_can_emulate

    specs = grid.specs()
    for bandwidth in {s.bandwidth for s in specs}:
        check_can_emulate(bandwidth)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = ResultLog(out_dir / "results.json", len(specs), progress)
    groups: dict[tuple[int, str, str], list[BenchSpec]] = {}
    for s in specs:
        groups.setdefault((s.workers, s.bandwidth, s.latency), []).append(s)
    with tempfile.TemporaryDirectory(prefix="gradzip-bench-") as tmp, log:
        for (_, bandwidth, latency), group in groups.items():
            # One host per process: dedicated parameter servers get hosts (and links) of their own.
            with EmulatedCluster(max(s.processes() for s in group), bandwidth, latency) as cluster:
                for spec in group:
                    log.start(spec.label())
                    log.add(run_spec(spec, cluster, Path(tmp)))
    return log.rows


REAL_NETWORK = "cluster"
"""The bandwidth label of configurations measured on torchrun's real network (no emulation)."""


def run_grid_under_torchrun(grid: Grid, out_dir: Path, progress: bool = True) -> list[dict[str, Any]] | None:
    """``gradzip bench`` started by torchrun on a real cluster: no emulation, the world is torchrun's.

    Each configuration still runs in fresh processes: every torchrun process starts one worker on its own
    host, with torchrun's rank and world and a port that rank 0 picks for the configuration. The torchrun
    processes only coordinate (a gloo group of their own). Returns the results on rank 0, None elsewhere."""
    from datetime import timedelta

    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    specs = grid.specs()
    # Long enough for the slowest configuration between two coordination messages.
    dist.init_process_group("gloo", timeout=timedelta(seconds=max(s.timeout for s in specs) + 600))
    # Only rank 0 keeps (and saves) the results and shows the bar.
    log = ResultLog(out_dir / "results.json" if rank == 0 else None, len(specs), progress and rank == 0)
    try:
        with tempfile.TemporaryDirectory(prefix="gradzip-bench-") as tmp, log:
            for i, spec in enumerate(specs):
                log.start(spec.label())
                row = _run_spec_with_torchrun(spec, rank, world, Path(tmp) / f"result-{i}.json")
                log.add(row if rank == 0 else None)
    finally:
        dist.destroy_process_group()
    return log.rows if rank == 0 else None


def _run_spec_with_torchrun(spec: BenchSpec, rank: int, world: int, out: Path) -> dict[str, Any]:
    import torch.distributed as dist

    if spec.processes() != world:
        return {
            "spec": dataclasses.asdict(spec),
            "error": f"needs {spec.processes()} processes ({spec.servers()} of them servers); torchrun "
            f"started {world}",
        }
    box: list[Any] = [free_port() if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    # A rendezvous of the configuration's own, on a fresh port: not the torchrun agent's store, which the
    # worker would otherwise join as a client (TORCHELASTIC_USE_AGENT_STORE) and wait on forever.
    # No link of the worker's own either: a real network interface carries every process's traffic.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_") and k != LINK_ENV}
    env["MASTER_PORT"] = str(box[0])
    argv = [sys.executable, "-m", "gradzip.bench.worker", json.dumps(dataclasses.asdict(spec)), str(out)]
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=spec.timeout + 60)
        status = (done.returncode, last_line(done.stdout + done.stderr) or "no output")
    except subprocess.TimeoutExpired:
        status = (-1, f"timed out after {spec.timeout + 60:.0f} s")
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, status)
    failed = next((r for r, (code, _) in enumerate(everyone) if code != 0), None)
    if failed is None and out.exists():
        result: dict[str, Any] = json.loads(out.read_text())
        return result
    reason = f"rank {failed} failed: {everyone[failed][1]}" if failed is not None else "no result written"
    return {"spec": dataclasses.asdict(spec), "error": reason}


class ResultLog:
    """The results of a run so far, saved after each one (an interrupted run loses nothing), with a progress
    bar. Used as a context manager, which closes the bar."""

    def __init__(
        self, path: Path | None, total: int, progress: bool, unit: str = "config", references: bool = True
    ) -> None:
        self.rows: list[dict[str, Any]] = []
        self.path = path
        self.references = references
        self.bar = progress_bar(total, progress, unit)

    def __enter__(self) -> ResultLog:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def start(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_description(label)

    def add(self, row: dict[str, Any] | None) -> None:
        """One more result (None: one more step of the bar only); speed-ups and floor ratios are refreshed."""
        if row is not None:
            self.rows.append(row)
            if self.references:
                add_references(self.rows)
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                save_json(self.rows, self.path)
        if self.bar is not None:
            self.bar.update()


def progress_bar(total: int, enabled: bool, unit: str = "config") -> Any:
    """A tqdm bar, or None when disabled."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, dynamic_ncols=True)


def save_json(results: Iterable[dict[str, Any]], path: Path) -> None:
    write_atomic(path, json.dumps(list(results), indent=1))  # an interrupted write never leaves half a file
