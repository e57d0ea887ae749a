"""What one training iteration of a model costs on a device, layer by layer: the simulator's input.

``gradzip profile --model M`` measures, on the current device:

* per parameter, its gradient's size and the backward time since the previous gradient became ready (a
  post-accumulate-grad hook on every parameter stamps the time), in the order gradients become ready: the
  order DDP fills its buckets in;
* the forward pass and the optimizer step (SGD with momentum, as ``gradzip train`` runs it);
* each compression method's local work per gradient element: the kernel pass of ``gradzip bench --kernels``
  (compress, then decompress at a world of one) over this model's shapes, and for the methods that
  all-gather, what decoding one more worker's payload adds;
* the memory-copy rate, which bounds any work the simulator has no measurement for (gossip's averaging).

A profile is measured with ``processes`` copies of the model training side by side on the same cores (the
emulated cluster's condition: 4 workers on a 2-core machine, one thread each, each run a step about 3.5x
slower than one copy alone with both cores), or alone.
A profile can also be *derived* from another by scaling its times (``scaled``): labelled as such in
``source``, never passed off as measured.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# Methods whose local work the profile times with the kernel bench's passes (its names).
KERNEL_METHODS = ("sign", "topk", "randomk", "qsgd", "fp16", "powersgd", "acpsgd")
# Compressors decoded once per worker after an all-gather, by their compressor name.
GATHERED = ("signsgd", "topk", "qsgd")


@dataclass(frozen=True)
class Layer:
    """One parameter's gradient: its name, shape and the backward time spent since the gradient before it
    became ready."""

    name: str
    shape: tuple[int, ...]
    backward_s: float

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class ModelProfile:
    """A model's per-iteration costs on one device, at one batch size per worker."""

    model: str
    """Registry model name (or a user's label)."""
    device: str
    """Where it was measured (``cpu``, ``cuda``, or a GPU's name), or what it was derived for."""
    batch_size: int
    """Samples per worker per iteration."""
    forward_s: float
    """Seconds of the forward pass (loss included)."""
    optimizer_s: float
    """Seconds of the optimizer step."""
    layers: list[Layer]
    """Parameters in the order their gradients become ready in backward."""
    compress_s_per_element: dict[str, float] = field(default_factory=dict)
    """Seconds per gradient element of a method's local work at a world of one (kernel bench names: sign,
    topk, randomk, qsgd, fp16, powersgd, acpsgd)."""
    decode_s_per_element: dict[str, float] = field(default_factory=dict)
    """Seconds per gradient element to decode one more worker's payload (all-gather compressors: signsgd,
    topk, qsgd)."""
    copy_bytes_per_s: float = 5e9
    """Memory-copy rate of the device (bytes read per second)."""
    standalone_s_per_element: dict[str, float] = field(default_factory=dict)
    """Seconds per element of a compressor's plain ``encode`` and its dense ``decode`` (keys
    ``"<compressor>.encode"``, ``"<compressor>.decode"``): how Choco-SGD uses them, one tensor at a time,
    outside the fused passes the kernel bench times."""
    alloc_s_per_element: float = 0.0
    """Seconds per float32 element to allocate a fresh large tensor and fill it (on a CPU, its page faults:
    a large allocation is fresh memory from the kernel every time)."""
    processes: int = 1
    """Copies of the model that ran side by side on the same cores while measuring."""
    cores: int = 0
    """CPU cores those copies shared (0: not recorded, or a GPU's profile)."""
    source: str = "measured"
    """``measured`` or ``derived: <how>``."""

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError(f"profile of {self.model!r} has no layers")
        if self.batch_size < 1 or self.processes < 1:
            raise ValueError("batch_size and processes must be >= 1")
        for name in ("forward_s", "optimizer_s", "copy_bytes_per_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: it must be >= 0")

    @property
    def backward_s(self) -> float:
        return sum(layer.backward_s for layer in self.layers)

    @property
    def numel(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def lone_speedup(self) -> float:
        """How much faster one process alone on the measuring machine runs this profile's per-element work
        than one of the ``processes`` copies that shared its ``cores`` did (1 where they did not contend).

        The emulated cluster's parameter server is such a process: it works while its workers wait for it,
        so their share of the cores is not its share."""
        return max(1.0, self.processes / self.cores) if self.cores else 1.0

    @property
    def measured(self) -> bool:
        return self.source == "measured"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"] = [[layer.name, list(layer.shape), layer.backward_s] for layer in self.layers]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelProfile:
        d = dict(d)
        d["layers"] = [Layer(name, tuple(shape), float(t)) for name, shape, t in d["layers"]]
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelProfile:
        """Read a profile written by ``save``; a missing or malformed file raises ValueError naming it."""
        p = Path(path)
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except FileNotFoundError:
            raise ValueError(
                f"profile file {str(p)!r} does not exist (write one with gradzip profile)"
            ) from None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"profile file {str(p)!r} is not a gradzip profile: {err}") from None

    def scaled(
        self, compute: float, memory: float, device: str, batch_size: int | None = None, why: str = ""
    ) -> ModelProfile:
        """A derived profile: compute times (forward, backward, optimizer) divided by ``compute`` (and
        multiplied by ``batch_size / self.batch_size`` for forward and backward), per-element work divided by
        ``memory``, labelled ``derived``."""
        batch = batch_size or self.batch_size
        b = batch / self.batch_size
        return dataclasses.replace(
            self,
            device=device,
            batch_size=batch,
            forward_s=self.forward_s * b / compute,
            optimizer_s=self.optimizer_s / compute,
            layers=[dataclasses.replace(x, backward_s=x.backward_s * b / compute) for x in self.layers],
            compress_s_per_element={k: v / memory for k, v in self.compress_s_per_element.items()},
            decode_s_per_element={k: v / memory for k, v in self.decode_s_per_element.items()},
            standalone_s_per_element={k: v / memory for k, v in self.standalone_s_per_element.items()},
            copy_bytes_per_s=self.copy_bytes_per_s * memory,
            alloc_s_per_element=self.alloc_s_per_element / memory,
            cores=0,  # the measuring machine's contention does not carry over to the device derived
            source=f"derived: {why}" if why else "derived",
        )


# ------------------------------------------------------------------------------------------ measuring


def measure_compute(
    model_name: str,
    batch_size: int,
    device: str = "cpu",
    repeats: int = 5,
    image_size: int = 32,
    seq_len: int = 32,
    num_classes: int = 10,
) -> tuple[float, float, list[Layer]]:
    """Forward seconds, optimizer seconds and the layers (ready order, backward time each): medians over
    ``repeats`` iterations after one warm-up."""
    from gradzip.train.models import build_model

    dev = torch.device(device)
    from gradzip.bench.worker import random_batch

    x, y, shape = random_batch(model_name, batch_size, image_size, seq_len, 1, num_classes)
    x, y = x.to(dev), y.to(dev)
    torch.manual_seed(0)
    model = build_model(model_name, shape, num_classes).to(dev)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    stamps: dict[str, float] = {}

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def stamp(name: str) -> Any:
        def hook(_: torch.Tensor) -> None:
            sync()
            stamps[name] = time.perf_counter()

        return hook

    handles = [p.register_post_accumulate_grad_hook(stamp(n)) for n, p in params]
    forwards, optims, readies = [], [], []
    try:
        for i in range(repeats + 1):
            # As the training loop does: fresh gradients every step, whose allocation backward pays for.
            opt.zero_grad(set_to_none=True)
            sync()
            t0 = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            sync()
            t1 = time.perf_counter()
            stamps.clear()
            loss.backward()
            sync()
            t2 = time.perf_counter()
            opt.step()
            sync()
            t3 = time.perf_counter()
            if i:  # the first iteration allocates
                forwards.append(t1 - t0)
                optims.append(t3 - t2)
                readies.append({n: stamps.get(n, t2) - t1 for n, _ in params})
    finally:
        for h in handles:
            h.remove()
    ready = {n: statistics.median(r[n] for r in readies) for n, _ in params}
    order = sorted(params, key=lambda np_: ready[np_[0]])
    layers, before = [], 0.0
    for n, p in order:
        layers.append(Layer(n, tuple(p.shape), max(0.0, ready[n] - before)))
        before = max(before, ready[n])
    return statistics.median(forwards), statistics.median(optims), layers


def measure_decode(compressor: str, numel: int = 1 << 22, repeats: int = 5) -> float:
    """Seconds per element that decoding one more worker's payload adds to an all-gather aggregate."""
    from gradzip.config import make_compressor

    comp = make_compressor(compressor)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    payload, _ = comp.encode(x.clone())
    out = torch.empty(numel)

    def timed(world: int) -> float:
        gathered = [p.unsqueeze(0).repeat(world, *([1] * p.dim())) for p in payload]
        comp.aggregate(gathered, numel, None, out)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            comp.aggregate(gathered, numel, None, out)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return max(0.0, (timed(3) - timed(1)) / 2 / numel)


STANDALONE = ("signsgd", "topk", "randomk", "qsgd", "fp16")
"""The compressors Choco-SGD may gossip with (identity aside)."""


def measure_standalone(compressor: str, numel: int = 1 << 22, repeats: int = 5) -> tuple[float, float]:
    """Seconds per element of ``compressor``'s plain ``encode`` and dense ``decode`` of a fresh tensor."""
    from gradzip.config import make_compressor

    comp = make_compressor(compressor)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    enc, dec = [], []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        payload, ctx = comp.encode(x)
        t1 = time.perf_counter()
        comp.decode(payload, ctx, numel)
        t2 = time.perf_counter()
        if i:
            enc.append(t1 - t0)
            dec.append(t2 - t1)
    return statistics.median(enc) / numel, statistics.median(dec) / numel


def measure_alloc(numel: int = 1 << 24, repeats: int = 5) -> float:
    """Seconds per element of ``torch.zeros`` of a fresh 64 MB tensor: allocation, first touch and fill."""
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        x = torch.zeros(numel)
        times.append(time.perf_counter() - t0)
        del x
    return statistics.median(times[1:]) / numel


def measure_profile(
    model: str,
    batch_size: int,
    device: str = "cpu",
    repeats: int = 5,
    image_size: int = 32,
    seq_len: int = 32,
    kernels: bool = True,
    processes: int = 1,
    num_classes: int = 10,
) -> ModelProfile:
    """Measure ``model``'s profile here (see the module docstring); ``processes`` records how many copies
    were running side by side (:func:`measure_side_by_side` starts them). ``num_classes`` sizes the head
    (the benchmark's 10; ImageNet's 1000 for the paper's ResNets)."""
    from gradzip.bench.kernels import REFERENCE, run_kernels
    from gradzip.train.env import usable_cores

    forward, optimizer, layers = measure_compute(
        model, batch_size, device, repeats, image_size, seq_len, num_classes
    )
    compress: dict[str, float] = {}
    decode: dict[str, float] = {}
    copy = 5e9
    alloc = 0.0
    standalone: dict[str, float] = {}
    if kernels:
        # The kernel bench's shapes of this model; a pass over more than 1 s is timed on a subset.
        results = run_kernels(model, list(KERNEL_METHODS), repeats=3, device=device, threads=None)
        for r in results:
            copy = r.copy_gbytes_per_s * 1e9
            if r.method != REFERENCE:
                compress[r.method] = r.seconds / r.numel
        if device == "cpu":
            decode = {c: measure_decode(c) for c in GATHERED}
            alloc = measure_alloc()
            for c in STANDALONE:
                standalone[f"{c}.encode"], standalone[f"{c}.decode"] = measure_standalone(c)
    return ModelProfile(
        model=model,
        device=_device_label(device),
        batch_size=batch_size,
        forward_s=forward,
        optimizer_s=optimizer,
        layers=layers,
        compress_s_per_element=compress,
        decode_s_per_element=decode,
        copy_bytes_per_s=copy,
        standalone_s_per_element=standalone,
        alloc_s_per_element=alloc,
        processes=processes,
        cores=usable_cores() if device == "cpu" else 0,
    )


def _device_label(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(torch.device(device))})"
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# ------------------------------------------------------------------------------------------ side by side


def measure_side_by_side(
    model: str,
    batch_size: int,
    processes: int,
    repeats: int = 5,
    image_size: int = 32,
    seq_len: int = 32,
    kernels: bool = True,
    timeout: float = 900.0,
) -> ModelProfile:
    """``measure_profile`` in ``processes`` copies at once on this machine, each with its share of the cores
    (as every worker of the emulated cluster runs): their mean, with ``processes`` recorded."""
    import os
    import subprocess
    import sys
    import tempfile

    if processes < 1:
        raise ValueError(f"processes={processes} is invalid: it must be >= 1")
    args = dict(
        model=model, batch_size=batch_size, repeats=repeats, image_size=image_size, seq_len=seq_len,
        kernels=kernels, processes=processes,
    )  # fmt: skip
    # Every copy starts measuring once all have imported torch (a barrier of files): copies that started
    # apart would each see fewer busy neighbours than the cluster's workers do.
    with tempfile.TemporaryDirectory(prefix="gradzip-profile-") as tmp:
        outs = [os.path.join(tmp, f"{i}.json") for i in range(processes)]
        # LOCAL_WORLD_SIZE gives each copy the thread share a worker of the cluster gets.
        env = {**os.environ, "LOCAL_WORLD_SIZE": str(processes)}
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "gradzip.sim.profile", json.dumps(args), out, tmp, str(processes)],
                env=env,
                stderr=subprocess.PIPE,
                text=True,
            )
            for out in outs
        ]
        try:
            deadline = time.monotonic() + timeout
            for proc in procs:
                try:
                    _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    raise RuntimeError(f"profiling {model} took over {timeout:.0f} s; stopped") from None
                if proc.returncode:
                    last = err.strip().splitlines()[-1] if err.strip() else f"exit code {proc.returncode}"
                    raise RuntimeError(f"profiling {model} failed: {last}")
        finally:
            for proc in procs:  # one copy failed or ran out of time: the others go too
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        return mean_profile([ModelProfile.load(out) for out in outs])


def mean_profile(profiles: list[ModelProfile]) -> ModelProfile:
    """The element-wise mean of profiles of the same model (its copies measured side by side)."""
    first = profiles[0]

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    # By name: copies may order near-simultaneous gradients (a weight and its bias) differently.
    by_name = [{layer.name: layer.backward_s for layer in p.layers} for p in profiles]
    layers = [
        dataclasses.replace(layer, backward_s=mean([b[layer.name] for b in by_name]))
        for layer in first.layers
    ]
    return dataclasses.replace(
        first,
        forward_s=mean([p.forward_s for p in profiles]),
        optimizer_s=mean([p.optimizer_s for p in profiles]),
        layers=layers,
        compress_s_per_element={
            k: mean([p.compress_s_per_element[k] for p in profiles]) for k in first.compress_s_per_element
        },
        decode_s_per_element={
            k: mean([p.decode_s_per_element[k] for p in profiles]) for k in first.decode_s_per_element
        },
        standalone_s_per_element={
            k: mean([p.standalone_s_per_element[k] for p in profiles]) for k in first.standalone_s_per_element
        },
        copy_bytes_per_s=mean([p.copy_bytes_per_s for p in profiles]),
        alloc_s_per_element=mean([p.alloc_s_per_element for p in profiles]),
    )


def _barrier(directory: Path, count: int, me: str, timeout: float = 120.0) -> None:
    """Wait until ``count`` copies have arrived in ``directory`` (each leaves a file), or ``timeout``."""
    (directory / f"{Path(me).name}.ready").touch()
    deadline = time.monotonic() + timeout
    while len(list(directory.glob("*.ready"))) < count and time.monotonic() < deadline:
        time.sleep(0.01)


def _main(argv: list[str]) -> int:
    """One copy of :func:`measure_side_by_side`: ``python -m gradzip.sim.profile ARGS_JSON OUT``."""
    from gradzip.train.env import threads_per_worker

    torch.set_num_threads(threads_per_worker())
    args = json.loads(argv[0])
    if len(argv) > 3:
        _barrier(Path(argv[2]), int(argv[3]), argv[1])
    measure_profile(**args).save(argv[1])
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(_main(sys.argv[1:]))
