"""``torchrun`` across hosts: two hosts of the emulated cluster (each its own network namespace, reached only
through a 1 Gbit/s link), one ``torchrun --nnodes 2 --nproc-per-node 1 -m gradzip train`` on each, the
rendezvous on the first; both finish, with the same model on both."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gradzip.bench.cluster import EmulatedCluster
from gradzip.bench.iproute import ClusterError
from gradzip.bench.network import check_can_emulate


def _can_emulate() -> str | None:
    try:
        check_can_emulate("1gbit")
    except ClusterError as err:
        return str(err)
    return None


@pytest.mark.skipif(_can_emulate() is not None, reason=f"no network namespaces here: {_can_emulate()}")
def test_torchrun_on_two_hosts_trains_the_same_model_on_both(tmp_path: Path) -> None:
    with EmulatedCluster(2, "1gbit") as cluster:
        master = cluster.hosts[0].address
        procs = []
        for node in range(2):
            argv = [
                sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--node-rank", str(node), "--master-addr", master, "--master-port", "29511",
                "-m", "gradzip", "train", "--method", "acpsgd", "--steps", "30", "--quiet", "--backend", "gloo",
                "--timeout", "60", "--json", str(tmp_path / "run.json"),
            ]  # fmt: skip
            # gloo must use the host's link (its only interface besides loopback).
            env = {**os.environ, "GLOO_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": "1"}
            procs.append(
                subprocess.Popen(
                    cluster.command(node, argv), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
                )
            )
        outputs = []
        for p in procs:
            out, _ = p.communicate(timeout=240)
            outputs.append(out.decode(errors="replace"))
    for node, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"host {node}:\n{out[-3000:]}"
    summary = json.loads((tmp_path / "run.json").read_text())  # rank 0's, on host 0
    assert summary["workers"] == 2 and summary["steps"] == 30
    assert summary["params_identical"], "the two hosts ended with different models"
    assert summary["bytes_sent_per_step"] > 0
    assert "test accuracy" in outputs[0]  # rank 0 printed the summary
