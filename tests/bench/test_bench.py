"""`gradzip bench` end to end on a tiny grid: output structure and cleanup, never a timing assertion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradzip.bench.netns import leftover_namespaces
from gradzip.bench.runner import Grid, add_references

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="emulating a limited link needs root (CI runs as root)"
)


def bench(out: Path, *args: str, timeout: float) -> None:
    """``gradzip bench ARGS --out OUT --quiet`` in a real interpreter; it must succeed."""
    cmd = [sys.executable, "-m", "gradzip", "bench", *args, "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]


@needs_root
def test_bench_tiny_grid_writes_results_and_cleans_up(tmp_path: Path) -> None:
    before = set(leftover_namespaces())
    out = tmp_path / "bench"
    bench(
        out, "--methods",
        "floor,ssgd,acpsgd,torch-powersgd,powergossip,doublesqueeze:placement=server,doublesqueeze-async",
        "--models", "mlp", "--workers", "2", "--bandwidth", "100mbit,unlimited", "--warmup", "3",
        "--iters", "2", timeout=400,
    )  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert len(results) == 14
    assert not [r["error"] for r in results if "error" in r]
    by = {(r["spec"]["bandwidth"], r["spec"]["method"]): r for r in results}
    for bandwidth in ("100mbit", "unlimited"):
        floor, ssgd, acp = (by[(bandwidth, m)] for m in ("floor", "ssgd", "acpsgd"))
        assert acp["speedup_vs_ssgd"] == ssgd["median_s"] / acp["median_s"]
        assert acp["vs_floor"] == acp["median_s"] / floor["median_s"]
        assert len(acp["iteration_s"]) == 2
        # bytes come from the hooks' own counters; ACP-SGD sends a small fraction of ssgd's
        assert 0 < acp["bytes_sent_per_step"] < ssgd["bytes_sent_per_step"] / 5
        assert floor["bytes_sent_per_step"] is None and floor["wait_s"] is None
        for part in ("forward_backward_s", "compress_s", "wait_s", "optimizer_s"):
            assert acp[part] is not None and acp[part] >= 0
        assert "one DDP bucket" in by[(bandwidth, "torch-powersgd")]["note"]
        # a gossip method: neighbour messages only (a ring of 2: one neighbour), counted by its exchange
        gossip = by[(bandwidth, "powergossip")]
        assert (
            0
            < gossip["bytes_sent_per_step"]
            == gossip["bytes_received_per_step"]
            < ssgd["bytes_sent_per_step"]
        )
        assert gossip["compress_s"] is not None and gossip["wait_s"] is not None
        # dedicated servers (a third host): each worker pushes a compressed part and receives one back
        for m in ("doublesqueeze", "doublesqueeze-async"):
            ps = by[(bandwidth, m)]
            assert 0 < ps["bytes_sent_per_step"] < ssgd["bytes_sent_per_step"] / 5, m
            assert ps["wait_s"] is not None and ps["wait_s"] > 0, m
    table = (out / "results.md").read_text()
    assert table.count("\n") == 2 + len(results) and "| acpsgd (rank=4) |" in table
    assert (out / "time_vs_bandwidth.png").stat().st_size > 1000
    assert (out / "breakdown.png").stat().st_size > 1000
    assert set(leftover_namespaces()) <= before, "bench left network namespaces behind"


def test_grid_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown method 'nope'; valid methods: floor, torch-powersgd"):
        Grid(methods=["nope"])
    with pytest.raises(ValueError, match="unknown model 'resnet9'"):
        Grid(models=["resnet9"])
    with pytest.raises(ValueError, match="needs >= 2 workers"):
        Grid(workers=[1])
    with pytest.raises(ValueError, match="warmup=1"):
        Grid(warmup=1)
    with pytest.raises(ValueError, match="placement='moon' is invalid"):
        Grid(methods=["doublesqueeze:placement=moon"])
    with pytest.raises(ValueError, match="write NAME:KEY=VALUE"):
        Grid(methods=["choco:topk"])
    with pytest.raises(ValueError, match="device='gpu' is invalid: use cpu or cuda"):
        Grid(device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            Grid(device="cuda")
    with pytest.raises(ValueError, match="floor takes no options but rank"):
        Grid(methods=["floor:density=2"])


def test_methods_take_options_and_server_placements_get_hosts_of_their_own() -> None:
    specs = Grid(
        methods=[
            "doublesqueeze:placement=server:servers=2:compressor=topk",
            "doublesqueeze-async",
            "acpsgd:rank=2",
        ],
        ranks=[4, 8],
        bandwidths=["1gbit"],
    ).specs()
    by = {(s.method, tuple(sorted(s.options.items()))): s for s in specs}
    sync = by[("doublesqueeze", (("compressor", "topk"), ("placement", "server"), ("servers", 2)))]
    assert (sync.servers(), sync.processes()) == (2, 6)
    assert by[("doublesqueeze-async", ())].processes() == 5  # one server by default
    assert [s.options for s in specs if s.method == "acpsgd"] == [{"rank": 2}]  # given rank: no sweep
    assert by[("acpsgd", (("rank", 2),))].processes() == 4


def test_grid_measures_references_first_and_ranks_only_low_rank_methods() -> None:
    specs = Grid(methods=["acpsgd", "topk", "ssgd", "floor"], ranks=[2, 4], bandwidths=["1gbit"]).specs()
    assert [s.method for s in specs[:2]] == ["floor", "ssgd"]
    assert [s.options for s in specs if s.method == "acpsgd"] == [{"rank": 2}, {"rank": 4}]
    assert [s.options for s in specs if s.method == "topk"] == [{}]


def test_references_come_from_the_same_group() -> None:
    def result(method: str, bandwidth: str, median: float) -> dict:
        spec = dict(model="m", workers=2, bandwidth=bandwidth, latency="0ms", batch_size=8, bucket_cap_mb=25.0,
                    image_size=8, seq_len=8, method=method, options={})  # fmt: skip
        return {"spec": spec, "median_s": median}

    rs = [result("floor", "1gbit", 1.0), result("ssgd", "1gbit", 4.0), result("acpsgd", "1gbit", 2.0),
          result("ssgd", "unlimited", 1.5), result("acpsgd", "unlimited", 3.0)]  # fmt: skip
    add_references(rs)
    assert rs[2]["speedup_vs_ssgd"] == 2.0 and rs[2]["vs_floor"] == 2.0
    assert rs[4]["speedup_vs_ssgd"] == 0.5 and rs[4]["vs_floor"] is None  # no floor in that group


@needs_root
def test_time_to_accuracy_trains_each_method_on_the_cluster(tmp_path: Path) -> None:
    before = set(leftover_namespaces())
    out = tmp_path / "tta"
    bench(
        out, "--time-to-accuracy", "--methods", "floor,ssgd,acpsgd", "--workers", "2", "--bandwidth",
        "100mbit", "--steps", "100", "--eval-every", "20", "--target-accuracy", "0.5", timeout=300,
    )  # fmt: skip
    rows = json.loads((out / "time_to_accuracy.json").read_text())
    assert [r["method"] for r in rows] == ["ssgd", "acpsgd"]  # the floor does not train
    for r in rows:
        assert "error" not in r, r
        assert [e["step"] for e in r["accuracy_history"]] == [20, 40, 60, 80, 100]
        assert r["params_identical"] and r["bandwidth"] == "100mbit" and r["workers"] == 2
        assert r["steps_to_target"] in (20, 40, 60, 80, 100)
        assert 0 < r["time_to_target_s"] <= r["total_train_time_s"]
    assert (out / "time_to_accuracy.png").stat().st_size > 1000
    assert "| 100mbit | acpsgd |" in (out / "time_to_accuracy.md").read_text()
    assert set(leftover_namespaces()) <= before


def test_run_in_cluster_names_the_failed_rank_reports_timeouts_and_forces_loopback(tmp_path: Path) -> None:
    from gradzip.bench.cluster import EmulatedCluster
    from gradzip.bench.runner import run_in_cluster

    def script(body: str) -> list[str]:
        return [sys.executable, "-c", f"import os, sys, time\n{body}"]

    with EmulatedCluster(3, "unlimited") as cluster:
        # outside namespaces gloo must use loopback, whatever the caller's environment says
        os.environ["GLOO_SOCKET_IFNAME"] = "eth0"
        try:
            ok = run_in_cluster(
                cluster,
                3,
                script("sys.exit(0 if os.environ['GLOO_SOCKET_IFNAME'] == 'lo' else 5)"),
                60,
                tmp_path,
            )
        finally:
            del os.environ["GLOO_SOCKET_IFNAME"]
        assert ok is None
        dead = run_in_cluster(
            cluster, 3, script("print('boom on', os.environ['RANK']); sys.exit(3 if os.environ['RANK'] == '1' else 0)"),
            60, tmp_path,
        )  # fmt: skip
        assert dead == "rank 1 failed: boom on 1"
        slow = run_in_cluster(cluster, 2, script("time.sleep(60)"), 1, tmp_path)
        assert slow is not None and slow.startswith("timed out after 1 s")


def test_bench_under_torchrun_measures_on_torchruns_processes(tmp_path: Path) -> None:
    """A real cluster: torchrun's world and network, no emulation, each configuration in fresh processes."""
    out = tmp_path / "bench"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "WORLD_SIZE", "RANK")
    }
    env["GLOO_SOCKET_IFNAME"] = "lo"  # one machine: loopback only
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
        "-m", "gradzip", "bench", "--methods", "floor,ssgd,acpsgd,doublesqueeze-async", "--models", "mlp",
        "--iters", "2", "--out", str(out), "--quiet",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no emulation" in proc.stderr
    results = json.loads((out / "results.json").read_text())
    by = {r["spec"]["method"]: r for r in results}
    assert set(by) == {"floor", "ssgd", "acpsgd", "doublesqueeze-async"}
    for m in ("floor", "ssgd", "acpsgd"):
        assert by[m]["spec"]["workers"] == 2 and by[m]["spec"]["bandwidth"] == "cluster"
        assert len(by[m]["iteration_s"]) == 2
    assert 0 < by["acpsgd"]["bytes_sent_per_step"] < by["ssgd"]["bytes_sent_per_step"]
    assert by["acpsgd"]["speedup_vs_ssgd"] == by["ssgd"]["median_s"] / by["acpsgd"]["median_s"]
    # a server placement needs more processes than torchrun started: said, not hung
    assert by["doublesqueeze-async"]["error"] == "needs 3 processes (1 of them servers); torchrun started 2"
    assert (out / "results.md").read_text().count("| cluster |") == 4


def test_rounds_repeat_the_grid_with_references_from_their_own_round() -> None:
    from gradzip.bench import report

    specs = Grid(methods=["floor", "ssgd", "acpsgd"], bandwidths=["1gbit"], rounds=3).specs()
    assert [(s.round, s.method) for s in specs] == [
        (r, m) for r in range(3) for m in ("floor", "ssgd", "acpsgd")
    ]
    # Synthetic timings: round r's floor is 100+r ms, ssgd 400 ms, acpsgd 150, 130 and 170 ms.
    acp = {0: 0.150, 1: 0.130, 2: 0.170}
    times = {"floor": lambda r: 0.100 + r / 1000, "ssgd": lambda r: 0.400, "acpsgd": lambda r: acp[r]}
    results = []
    for s in specs:
        spec = {**s.__dict__}
        t = times[s.method](s.round)
        parts = dict.fromkeys(("forward_backward_s", "compress_s", "wait_s", "optimizer_s"), None)
        sizes = dict.fromkeys(("bytes_sent_per_step", "bytes_received_per_step"), None)
        results.append(
            {"spec": spec, "median_s": t, "p10_s": t, "p90_s": t, "samples_per_s": 1.0, **parts, **sizes}
        )
    add_references(results)
    rows = {(r["spec"]["round"], r["spec"]["method"]): r for r in results}
    assert rows[(2, "acpsgd")]["vs_floor"] == acp[2] / times["floor"](2)  # its own round's floor
    picked = {r["spec"]["method"]: r for r in report.median_rounds(results)}
    assert picked["acpsgd"]["spec"]["round"] == 0  # 130 < 150 < 170 ms: the middle one
    line = next(ln for ln in report.across_rounds(results).splitlines() if "| acpsgd (rank=4) |" in ln)
    assert "| 3 | 150 (130–170) |" in line
    ratios = sorted(acp[r] / times["floor"](r) for r in range(3))
    assert f"{ratios[1]:.2f}x ({ratios[0]:.2f}x–{ratios[2]:.2f}x)" in line
    assert "| round |" in report.markdown(results).splitlines()[0]
    with pytest.raises(ValueError, match="rounds=0"):
        Grid(rounds=0)
