"""The CUDA paths, on a machine with a GPU: `make test-gpu` (CI has no GPU and does not collect this folder).

* every DDP hook with CUDA tensors, in 2 real processes sharing one GPU (gloo carries CUDA tensors; NCCL
  refuses two ranks on one device), against the same hook on the CPU from the same start, in float64;
* `gradzip train --backend nccl` end to end (one worker per GPU);
* the compression kernels on the GPU.
"""

# No `from __future__ import annotations`: DDP checks a hook's annotations as real objects.

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import gradzip
from gradzip.bench import kernels
from tests.distributed import run_workers
from tests.integrations.test_ddp import batch, mixed_net
from tests.integrations.test_nonfinite import check_skipped, skip_cases

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

METHODS = gradzip.methods("hook")
# Random-k draws from a generator on the tensors' device, whose stream differs from the CPU's. QSGD's keys
# come from the CPU generator on both, so it could be compared too; it stays out until a GPU run shows it.
DEVICE_RANDOM = {"randomk", "qsgd"}


def _train(method: str, device: torch.device, rank: int, steps: int = 4) -> tuple[torch.Tensor, bool]:
    """``steps`` SGD steps of ``method`` on ``device`` in float64; every worker's final flat parameters (on
    the CPU), and whether the workers stayed bit-identical after every step."""
    net = mixed_net().double().to(device)
    model = DDP(net, device_ids=[device.index] if device.type == "cuda" else None, bucket_cap_mb=0.004)
    state, hook = gradzip.ddp_hook(method, model=model)
    model.register_comm_hook(state, hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    identical = True
    for step in range(steps):
        x, y = batch(rank, step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.double().to(device)), y.to(device)).backward()
        opt.step()
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu()
        seen = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(seen, flat)
        identical &= all(torch.equal(s, seen[0]) for s in seen)
    return flat, identical


def _cuda_vs_cpu(rank: int, world: int) -> dict[str, dict[str, Any]]:
    torch.cuda.set_device(0)
    out = {}
    for method in METHODS:
        gpu, gpu_identical = _train(method, torch.device("cuda", 0), rank)
        cpu, _ = _train(method, torch.device("cpu"), rank)
        out[method] = {"gpu": gpu, "cpu": cpu, "identical": gpu_identical}
    return out


def test_every_hook_on_cuda_matches_the_cpu() -> None:
    got = run_workers(_cuda_vs_cpu, 2, timeout=600)[0]
    start = torch.cat([p.detach().reshape(-1) for p in mixed_net().double().parameters()])
    ssgd = got["ssgd"]["gpu"]
    gaps, failures = {}, []
    for method, r in got.items():
        moved = float((r["gpu"] - start).abs().max())
        if not (r["identical"] and moved > 1e-4 and torch.isfinite(r["gpu"]).all()):
            failures.append(f"{method}: identical={r['identical']}, moved {moved:.2e}")
        if method in DEVICE_RANDOM:
            continue
        gaps[method] = float((r["gpu"] - r["cpu"]).abs().max()) / moved
        # Payload scales (sign's mean magnitude, DoubleSqueeze's parts) travel as float32, so a float64
        # run on two devices agrees to float32 rounding, not to float64's; a real bug is off by percents.
        if gaps[method] > 1e-6:
            failures.append(f"{method}: CUDA and CPU differ by {gaps[method]:.2e} of the step")
        if method not in ("ssgd", "fp16") and float((r["gpu"] - ssgd).abs().max()) < 1e-3 * moved:
            failures.append(f"{method} equals ssgd: the comparison cannot tell methods apart")
    print("\nCUDA vs CPU, largest gap / largest step:", {m: f"{g:.1e}" for m, g in gaps.items()})
    assert not failures, failures


def _gradzip(*args: str, tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / "run.json"
    cmd = [sys.executable, "-m", "gradzip", "train", "--quiet", "--json", str(out), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary: dict[str, Any] = json.loads(out.read_text())
    return summary


@pytest.mark.parametrize("method", ["ssgd", "powersgd", "acpsgd", "doublesqueeze"])
def test_train_on_nccl(method: str, tmp_path: Path) -> None:
    workers = torch.cuda.device_count()
    s = _gradzip("--backend", "nccl", "--workers", str(workers), "--method", method, tmp_path=tmp_path)
    assert s["backend"] == "nccl"
    assert s["test_accuracy"] > 0.95, s


def test_nccl_with_more_workers_than_gpus_is_refused(tmp_path: Path) -> None:
    workers = torch.cuda.device_count() + 1
    cmd = [sys.executable, "-m", "gradzip", "train", "--backend", "nccl", "--workers", str(workers)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "GPU" in done.stderr and "Traceback" not in done.stderr


def _bucket_form_run(name: str, form: bool, tensors: int) -> tuple[torch.Tensor, int]:
    """One step of ``name`` over a bucket of ``tensors`` matrices on the GPU (after two warm-up steps): the
    reduced bucket and the CUDA kernels (memory copies and sets included) that the step ran."""
    from torch.profiler import ProfilerActivity, profile

    from gradzip.comm.collectives import SoloComm
    from gradzip.reducers.reducer import Bucket
    from gradzip.registry import get_spec, make_config

    reducer = get_spec(name).build(make_config(name), SoloComm()).use_nan_policy("skip")
    reducer.bucket_form = form  # type: ignore[attr-defined]
    shapes = [(300 + 7 * i, 33) for i in range(tensors)]
    keys = [f"w{i}" for i in range(tensors)]

    def bucket(step: int) -> Bucket:
        g = torch.Generator().manual_seed(step)
        return Bucket.of([torch.randn(s, generator=g).cuda() for s in shapes], keys)

    for step in range(2):
        reducer.launch(bucket(step)).wait()
    b = bucket(2)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        reducer.launch(b).wait()
        torch.cuda.synchronize()
    launched = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return b.buffer.cpu(), launched


@pytest.mark.parametrize("name", ["signsgd", "qsgd"])
def test_bucket_form_on_cuda_launches_per_bucket_and_matches_the_per_tensor_form(name: str) -> None:
    bucket_out, few = _bucket_form_run(name, True, 4)
    _, many = _bucket_form_run(name, True, 40)
    per_tensor_out, _ = _bucket_form_run(name, False, 4)
    _, per_tensor_many = _bucket_form_run(name, False, 40)
    print(f"\n{name}: CUDA kernels per step, bucket form 4 -> 40 tensors: {few} -> {many}; "
          f"per tensor: {per_tensor_many} at 40")  # fmt: skip
    # torch.cat and the foreach kernels take up to ~100 tensors a launch: a few more, not ten times more
    assert many <= few + 8 and per_tensor_many > 3 * many
    # The reductions (scale, norm) may sum in another order on the GPU than torch's per-tensor norm: float32
    # rounding apart, and for QSGD a level at most where a rounding flips.
    gap = (bucket_out - per_tensor_out).abs()
    if name == "signsgd":
        torch.testing.assert_close(bucket_out, per_tensor_out, rtol=1e-5, atol=0)
    else:
        assert float((gap > 1e-6).float().mean()) < 1e-3, float((gap > 1e-6).float().mean())


@pytest.mark.parametrize("name", ["signsgd", "qsgd"])
def test_bucket_form_on_cuda_never_waits_for_the_gpu(name: str) -> None:
    """The hook runs inside backward: a host sync there (a pageable upload, an .item()) would stall the queue.
    With nan_policy off (the screen's vote syncs on purpose) one step makes none."""
    from gradzip.comm.collectives import SoloComm
    from gradzip.reducers.reducer import Bucket
    from gradzip.registry import get_spec, make_config

    reducer = get_spec(name).build(make_config(name), SoloComm()).use_nan_policy("off")
    reducer.bucket_form = True  # type: ignore[attr-defined]
    shapes = [(300 + 7 * i, 33) for i in range(8)]
    buckets = [
        Bucket.of([torch.randn(s, device="cuda") for s in shapes], [f"w{i}" for i in range(8)])
        for _ in range(3)
    ]
    for b in buckets[:2]:  # allocations, the pinned host cache
        reducer.launch(b).wait()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fut = reducer.launch(buckets[2])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    fut.wait()
    assert torch.isfinite(buckets[2].buffer).all()


def test_kernels_on_cuda() -> None:
    results = kernels.run_kernels("resnet50", device="cuda", repeats=5)
    by = {r.method: r for r in results}
    assert set(by) == set(kernels.METHODS)
    for r in results:
        assert r.seconds > 0 and r.fraction_of_copy > 0, r
    print("\n" + kernels.format_table(results))


def test_bench_workers_on_cuda(tmp_path: Path) -> None:
    """`gradzip bench --device cuda`: every worker trains on the GPU; gossip and servers are refused."""
    out = tmp_path / "bench"
    cmd = [
        sys.executable, "-m", "gradzip", "bench", "--device", "cuda", "--bandwidth", "unlimited",
        "--workers", "2", "--methods", "floor,ssgd,acpsgd,torch-powersgd", "--iters", "3", "--quiet",
        "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert not [r["error"] for r in results if "error" in r]
    assert {r["spec"]["device"] for r in results} == {"cuda"}
    refused = subprocess.run([*cmd[:-2], "--methods", "powergossip"], capture_output=True, text=True)
    assert refused.returncode == 2 and "does not run on cuda" in refused.stderr


def _cpu_state_on_cuda(rank: int, world: int) -> dict[str, bool]:
    """A hook's state saved on the CPU (as a checkpoint loaded with map_location="cpu") continues on CUDA:
    the residuals and DGC velocity (topk) and the server residuals (doublesqueeze) follow the gradients."""
    torch.cuda.set_device(0)
    out = {}
    for method, options in [
        ("topk", {"momentum_correction": 0.9}),
        ("doublesqueeze", {"compressor": "topk"}),
    ]:
        saved = None
        for device in (torch.device("cpu"), torch.device("cuda", 0)):
            net = mixed_net().to(device)
            model = DDP(net, device_ids=[0] if device.type == "cuda" else None)
            state, hook = gradzip.ddp_hook(method, model=model, **options)
            model.register_comm_hook(state, hook)
            if saved is not None:
                state.load_state_dict(saved)
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            for step in range(2):
                x, y = batch(rank, step)
                opt.zero_grad()
                nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
                opt.step()
            saved = torch.load(_roundtrip(state.state_dict()), map_location="cpu", weights_only=True)
        out[method] = all(torch.isfinite(p).all() for p in model.parameters())
    return out


def _roundtrip(sd: dict[str, Any]) -> Any:
    import io

    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return buf


def test_a_state_loaded_on_the_cpu_continues_on_cuda() -> None:
    got = run_workers(_cpu_state_on_cuda, 2, timeout=300)[0]
    assert all(got.values()), got


def _skip_on_gpu(rank: int, world: int) -> dict[str, Any]:
    torch.cuda.set_device(0)
    cases = [("acpsgd", {}), ("topk", {"momentum_correction": 0.9}), ("doublesqueeze", {}), ("ssgd", {})]
    return skip_cases(rank, world, cases, "cuda:0")


def test_a_nan_on_cuda_is_skipped_by_every_worker_with_the_screen_on_the_device() -> None:
    """The CUDA screen (a masked fill on the device, read once per step) skips exactly like the CPU's."""
    check_skipped(run_workers(_skip_on_gpu, 2, timeout=600))
