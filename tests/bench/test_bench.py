"""`gradzip bench` end to end on a tiny grid: output structure and cleanup, never a timing assertion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from gradzip.bench import report
from gradzip.bench.netns import leftover_namespaces
from gradzip.bench.runner import Grid, add_references, run_grid
from gradzip.util import format_bytes

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
    # One bandwidth (the loopback of `unlimited` is tested by test_bench_under_torchrun..., where no link
    # of the worker's own gives no measured wire bytes, and by the cluster tests).
    before = set(leftover_namespaces())
    out = tmp_path / "bench"
    bench(
        out, "--methods",
        "floor,ssgd,acpsgd,torch-powersgd,powergossip,doublesqueeze:placement=server,doublesqueeze-async",
        "--models", "mlp", "--workers", "2", "--bandwidth", "100mbit", "--warmup", "3",
        "--iters", "2", timeout=400,
    )  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert len(results) == 7
    assert not [r["error"] for r in results if "error" in r]
    by = {r["spec"]["method"]: r for r in results}
    assert {r["spec"]["bandwidth"] for r in results} == {"100mbit"}
    floor, ssgd, acp = (by[m] for m in ("floor", "ssgd", "acpsgd"))
    assert acp["speedup_vs_ssgd"] == ssgd["median_s"] / acp["median_s"]
    assert acp["vs_floor"] == acp["median_s"] / floor["median_s"]
    assert len(acp["iteration_s"]) == 2
    # bytes come from the hooks' own counters; ACP-SGD sends a small fraction of ssgd's
    assert 0 < acp["bytes_sent_per_step"] < ssgd["bytes_sent_per_step"] / 5
    assert floor["bytes_sent_per_step"] is None and floor["wait_s"] is None
    for part in ("forward_backward_s", "compress_s", "wait_s", "optimizer_s"):
        assert acp[part] is not None and acp[part] >= 0
    assert "one DDP bucket" in by["torch-powersgd"]["note"]
    # Wire bytes: measured through the worker's own link, against the model of what gradzip counted.
    for m in ("ssgd", "acpsgd", "powergossip", "doublesqueeze", "doublesqueeze-async"):
        r = by[m]
        measured, modelled = r["wire_bytes_sent_per_step"], r["model_wire_bytes_sent_per_step"]
        assert modelled > r["ring_bytes_per_step"] > 0, m
        assert abs(measured / modelled - 1) < 0.15, (m, measured, modelled)
    # a gossip method: neighbour messages only (a ring of 2: one neighbour), counted by its exchange
    gossip = by["powergossip"]
    assert (
        0 < gossip["bytes_sent_per_step"] == gossip["bytes_received_per_step"] < ssgd["bytes_sent_per_step"]
    )
    assert gossip["compress_s"] is not None and gossip["wait_s"] is not None
    # dedicated servers (a third host): each worker pushes a compressed part and receives one back
    for m in ("doublesqueeze", "doublesqueeze-async"):
        ps = by[m]
        assert 0 < ps["bytes_sent_per_step"] < ssgd["bytes_sent_per_step"] / 5, m
        assert ps["wait_s"] is not None and ps["wait_s"] > 0, m
    table = (out / "results.md").read_text()
    # One row per result (a note on an unreliable group may follow the table: timing is not asserted here).
    assert sum(ln.startswith("| mlp |") for ln in table.splitlines()) == len(results)
    assert "| acpsgd (rank=4) |" in table
    assert (out / "breakdown.png").stat().st_size > 1000
    assert not (out / "time_vs_bandwidth.png").exists()  # one bandwidth: no axis to plot against
    assert set(leftover_namespaces()) <= before, "bench left network namespaces behind"


@needs_root
def test_wire_bytes_are_measured_over_the_measured_iterations_and_match_the_model(tmp_path: Path) -> None:
    """Bytes through each worker's link (interface counters, headers of offloaded segments added back) against
    the stated model (``gradzip.bench.wire``): ring payloads, gloo's framing, TCP/IP/Ethernet headers and
    acknowledgements. One grid, 4 workers at 1 Gbit/s; the floor shows that the window holds the measured
    iterations only (its processes start, meet and exchange results over the same link)."""
    grid = Grid(
        models=["mlp"], methods=["floor", "ssgd", "signsgd", "acpsgd"], workers=[4], bandwidths=["1gbit"],
        warmup=3, iters=3,
    )  # fmt: skip
    results = run_grid(grid, tmp_path, progress=False)
    assert not [r["error"] for r in results if "error" in r]
    by = {r["spec"]["method"]: r for r in results}
    seen = {}
    for m in ("ssgd", "signsgd", "acpsgd"):
        r = by[m]
        for way in ("sent", "received"):
            measured, modelled = r[f"wire_bytes_{way}_per_step"], r[f"model_wire_bytes_{way}_per_step"]
            seen[m, way] = (round(measured), round(modelled), round(r["ring_bytes_per_step"]))
            assert abs(measured / modelled - 1) < 0.15, (m, way, measured, modelled)
        # Headers and gloo's framing come on top of the ring's payload, never below it.
        assert r["model_wire_bytes_sent_per_step"] > r["ring_bytes_per_step"] > 0
    print("wire bytes per worker per step (measured, modelled, ring payload):", seen)
    # Negative controls: the counters move with the traffic. The floor sends nothing in its window (start-up,
    # rendezvous and the results' exchange are outside it), ssgd sends megabytes, and ssgd and ACP-SGD differ by
    # the factor the model says (tens of times), which a count of anything else would not.
    floor = by["floor"]
    assert floor["wire_bytes_sent_per_step"] < 1000 and floor["wire_bytes_received_per_step"] < 1000
    assert floor["model_wire_bytes_sent_per_step"] is None  # the floor's hook counts nothing
    ssgd, acp = by["ssgd"], by["acpsgd"]
    assert ssgd["wire_bytes_sent_per_step"] > 2e6
    measured = ssgd["wire_bytes_sent_per_step"] / acp["wire_bytes_sent_per_step"]
    modelled = ssgd["model_wire_bytes_sent_per_step"] / acp["model_wire_bytes_sent_per_step"]
    assert modelled > 20 and abs(measured / modelled - 1) < 0.15, (measured, modelled)
    row = next(ln for ln in report.markdown(results).splitlines() if "| ssgd |" in ln)
    wire = (ssgd["wire_bytes_sent_per_step"], ssgd["model_wire_bytes_sent_per_step"])
    assert f"| {format_bytes(wire[0])} ({format_bytes(wire[1])}) |" in row  # measured (modelled)


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


def test_plots_follow_the_axes_the_grid_has(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: dict[str, Any] = {}
    save = report._save

    def capture(fig: Any, path: Path) -> Path:
        ax = fig.axes[0]  # what each plot holds, read before it is saved and closed
        drawn[path.name] = ([len(line.get_xdata()) for line in ax.lines], len(ax.patches))
        return save(fig, path)

    monkeypatch.setattr(report, "_save", capture)

    def result(method: str, bandwidth: str, workers: int, median: float) -> dict:
        spec = dict(model="m", workers=workers, bandwidth=bandwidth, latency="0ms", batch_size=8,
                    bucket_cap_mb=25.0, image_size=8, seq_len=8, method=method, options={})  # fmt: skip
        parts = {k: median / 4 for k in ("forward_backward_s", "compress_s", "wait_s", "optimizer_s")}
        return {"spec": spec, "median_s": median, **parts}

    rs = [
        result(m, b, w, t * w * (3 if b == "100mbit" else 1))
        for b in ("100mbit", "unlimited") for w in (2, 4)
        for m, t in (("floor", 1.0), ("ssgd", 4.0), ("acpsgd", 2.0))
    ]  # fmt: skip
    add_references(rs)
    written = {p.name for p in report.plots(rs, tmp_path)}
    assert written == {"time_vs_bandwidth.png", "speedup_vs_workers.png", "breakdown.png"}
    assert all((tmp_path / name).stat().st_size > 1000 for name in written)
    assert drawn["time_vs_bandwidth.png"][0] == [2, 2, 2]  # floor, ssgd, acpsgd at two bandwidths each
    lines, _ = drawn["speedup_vs_workers.png"]
    assert lines.count(2) >= 2  # ssgd and acpsgd at two worker counts (beside the 1.0 line)
    assert drawn["breakdown.png"][1] == 4 * 3  # four parts stacked for each of three methods
    # Negative control: one bandwidth and one worker count leave only the breakdown.
    one = [r for r in rs if r["spec"]["bandwidth"] == "100mbit" and r["spec"]["workers"] == 2]
    (tmp_path / "one").mkdir()
    assert {p.name for p in report.plots(one, tmp_path / "one")} == {"breakdown.png"}


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
    # No link of the worker's own on a real network: no measured wire bytes, the model all the same.
    assert by["ssgd"]["wire_bytes_sent_per_step"] is None and by["ssgd"]["model_wire_bytes_sent_per_step"] > 0
    assert by["ssgd"]["cpu"]["processes_on_host"] == [2, 2]  # torchrun's LOCAL_WORLD_SIZE
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


def _timed(
    method: str, median: float, p10: float, p90: float, bandwidth: str = "cluster", rnd: int = 0
) -> dict:
    """A synthetic result: only what references, flags and the table read (times in seconds)."""
    spec = dict(model="wide_mlp", workers=2, bandwidth=bandwidth, latency="0ms", batch_size=32,
                bucket_cap_mb=25.0, image_size=32, seq_len=32, method=method, options={}, round=rnd)  # fmt: skip
    parts = dict.fromkeys(("forward_backward_s", "compress_s", "wait_s", "optimizer_s"), None)
    sizes = dict.fromkeys(("bytes_sent_per_step", "bytes_received_per_step"), None)
    # What torchrun on two emulated hosts sharing 2 cores reports: each alone on its host, 2 threads, 2 cores.
    cpu = {"threads": [2, 2], "cores": [2, 2], "processes_on_host": [1, 1], "machine_cores": 2}
    return {"spec": spec, "median_s": median, "p10_s": p10, "p90_s": p90, "samples_per_s": 1.0, "cpu": cpu,
            **parts, **sizes}  # fmt: skip


def test_a_method_faster_than_the_floor_beyond_the_spread_flags_its_group_unreliable() -> None:
    # The run: the floor at 486-520 ms, acpsgd at 326-357 ms ("0.67x the floor").
    results = [
        _timed("floor", 0.500, 0.486, 0.520),
        _timed("ssgd", 0.900, 0.850, 0.950),
        _timed("acpsgd", 0.340, 0.326, 0.357),
        # Another bandwidth, same run: an ordinary group, not flagged.
        _timed("floor", 0.500, 0.486, 0.520, "1gbit"),
        _timed("acpsgd", 0.700, 0.650, 0.750, "1gbit"),
    ]
    add_references(results)
    reason = results[2]["unreliable"]
    assert all(r["unreliable"] == reason for r in results[:3])  # every row of the group, floor included
    assert "acpsgd beat the floor beyond the spread (p90 357 ms < the floor's p10 486 ms)" in reason
    # The likely cause, with the facts: threads per worker against usable cores and processes per host.
    assert "hosts likely share cores" in reason
    assert (
        "2 thread(s) per worker, 2 usable core(s), 1 process(es) per host, 2 core(s) on this machine"
        in reason
    )
    assert not any("unreliable" in r for r in results[3:])
    # The raw ratios stay in the JSON; the table prints none for the group, and says why below it.
    assert results[2]["vs_floor"] == pytest.approx(0.68)
    table = report.markdown(results)
    acp = next(ln for ln in table.splitlines() if "| cluster |" in ln and "| acpsgd |" in ln)
    assert "| unreliable | unreliable |" in acp and "0.68x" not in acp
    ok = next(ln for ln in table.splitlines() if "| 1gbit |" in ln and "| acpsgd |" in ln)
    assert "| 1.40x |" in ok
    assert "- wide_mlp, 2 workers, cluster, batch 32, bucket 25 MB, round 0: acpsgd beat the floor" in table
    # A host running more busy threads than its cores names that instead.
    crowded = [_timed("floor", 0.5, 0.49, 0.52), _timed("acpsgd", 0.3, 0.29, 0.31)]
    crowded[0]["cpu"] = {
        "threads": [1] * 4,
        "cores": [2] * 4,
        "processes_on_host": [4] * 4,
        "machine_cores": 2,
    }
    add_references(crowded)
    assert "the processes sharing a host run 4 busy threads on 2 cores" in crowded[1]["unreliable"]


def test_slower_than_the_floor_or_faster_within_the_spread_is_not_flagged() -> None:
    # Negative controls. Slower than the floor: the normal case.
    slower = [_timed("floor", 0.500, 0.486, 0.520), _timed("acpsgd", 0.600, 0.550, 0.650)]
    # A median below the floor's, but the spreads overlap (p90 492 ms >= the floor's p10 486 ms): noise.
    within = [_timed("floor", 0.500, 0.486, 0.520), _timed("acpsgd", 0.480, 0.470, 0.492)]
    # No floor in the group: nothing to compare with.
    alone = [_timed("ssgd", 0.9, 0.85, 0.95), _timed("acpsgd", 0.1, 0.09, 0.11)]
    for group in (slower, within, alone):
        add_references(group)
        assert not any("unreliable" in r for r in group), group
        assert "unreliable" not in report.markdown(group)
    assert within[1]["vs_floor"] == pytest.approx(0.96)
    # Flags follow the results: once the offending row is gone, so is the group's flag.
    results = [_timed("floor", 0.5, 0.486, 0.52), _timed("acpsgd", 0.34, 0.326, 0.357)]
    add_references(results)
    assert "unreliable" in results[0]
    del results[1]
    add_references(results)
    assert "unreliable" not in results[0]


def test_unreliable_rounds_are_left_out_of_the_ratios_across_rounds() -> None:
    results = [_timed("floor", 0.5, 0.486, 0.52, rnd=r) for r in range(2)]
    results += [_timed("acpsgd", 0.34, 0.326, 0.357, rnd=0), _timed("acpsgd", 0.6, 0.55, 0.65, rnd=1)]
    add_references(results)
    line = next(ln for ln in report.across_rounds(results).splitlines() if "| acpsgd |" in ln)
    assert "| 1.20x (1.20x–1.20x) (1 of 2 rounds unreliable) |" in line
    only_bad = [r for r in results if r["spec"]["round"] == 0]
    line = next(ln for ln in report.across_rounds(only_bad).splitlines() if "| acpsgd |" in ln)
    assert line.endswith("| unreliable | unreliable |")


def test_time_to_accuracy_command_lines_carry_the_task_and_method_options(tmp_path: Path) -> None:
    from gradzip.bench.accuracy import train_argv

    out = tmp_path / "run.json"
    argv, servers = train_argv(
        "topk:density=0.05", out, steps=2000, eval_every=20, target=0.9, model="cnn1d", dataset="mnist1d",
        lr=0.05, batch_size=32,
    )  # fmt: skip
    assert servers == 0
    text = " ".join(argv)
    assert "--method topk " in text and "--density 0.05" in text and f"--json {out}" in text
    assert "--model cnn1d --dataset mnist1d --lr 0.05 --batch-size 32" in text
    assert "--steps 2000 --eval-every 20 --target-accuracy 0.9" in text
    # Defaults stay gradzip train's: nothing passed that was not given.
    bare, _ = train_argv("ssgd", out, steps=10, eval_every=5, target=0.5)
    assert not {"--model", "--dataset", "--lr", "--batch-size"} & set(bare)
    # Renamed and boolean flags, as gradzip train spells them; servers beside the workers.
    argv, servers = train_argv(
        "doublesqueeze:placement=server:servers=2:seed=3", out, steps=1, eval_every=1, target=1
    )
    assert servers == 2 and "--compressor-seed 3" in " ".join(argv) and "--servers 2" in " ".join(argv)
    assert "--no-metrics" in train_argv("powergossip:metrics=false", out, steps=1, eval_every=1, target=1)[0]
    assert train_argv("doublesqueeze-async", out, steps=1, eval_every=1, target=1)[1] == 1
    with pytest.raises(ValueError, match="registry methods only"):
        train_argv("floor", out, steps=1, eval_every=1, target=1)
    with pytest.raises(ValueError, match="density"):
        train_argv("topk:density=2", out, steps=1, eval_every=1, target=1)


def test_time_to_accuracy_refuses_a_model_that_cannot_take_the_dataset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gradzip.cli import main

    code = main(
        ["bench", "--time-to-accuracy", "--models", "cnn", "--dataset", "mnist1d", "--out", str(tmp_path)]
    )
    err = capsys.readouterr().err
    assert code == 2 and "'cnn' needs an image input shape (C, H, W), got (1, 40)" in err
    assert not (tmp_path / "time_to_accuracy.json").exists()
