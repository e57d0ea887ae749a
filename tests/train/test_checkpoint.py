"""Checkpoints and exact resume, on real processes through ``run_worker``: for every method family, N steps
straight and k steps, a resume and N - k more give bit-identical models, optimizers and method states; a
checkpoint of another run, a corrupt one or one past the run's end is refused before any worker starts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from gradzip.cli import main
from gradzip.train import checkpoint
from gradzip.train.config import TrainConfig
from gradzip.train.worker import run_worker
from tests.distributed import differences, free_port, run_workers

N, K = 12, 6  # steps of a run, and where the interrupted one stops


def _runs(
    rank: int, world: int, cases: list[tuple[str, dict[str, Any], int]], root: str, ports: list[int]
) -> None:
    """For each case: N steps straight; K steps; a resume to N (every run on a fresh rendezvous)."""
    plans = [("straight", N, False), ("resumed", K, False), ("resumed", N, True)]
    runs = [(i, case, plan) for i, case in enumerate(cases) for plan in plans]
    for (i, (method, options, workers), (name, steps, resume)), port in zip(runs, ports, strict=True):
        os.environ["MASTER_PORT"] = str(port)
        cfg = TrainConfig(
            method=method, options=dict(options), workers=workers, steps=steps, quiet=True, backend="gloo",
            checkpoint_dir=f"{root}/{i}-{name}", checkpoint_every=K, resume=resume,
        )  # fmt: skip
        run_worker(cfg)


def _ports(n: int) -> list[int]:
    return [free_port() for _ in range(n)]


def _states(root: Path, case: int, name: str, step: int, ranks: int) -> list[dict[str, Any]]:
    return [checkpoint.load(root / f"{case}-{name}", step, r) for r in range(ranks)]


def _check_exact(root: Path, case: int, processes: int) -> None:
    straight = _states(root, case, "straight", N, processes)
    resumed = _states(root, case, "resumed", N, processes)
    for rank, (a, b) in enumerate(zip(straight, resumed, strict=True)):
        for part in ("model", "optimizer", "exchange", "rng"):
            assert not differences(a[part], b[part]), (case, rank, part, differences(a[part], b[part])[:5])
        assert [r["loss"] for r in a["records"]] == [r["loss"] for r in b["records"]], (case, rank)
        assert a["step"] == b["step"] == N and len(b["records"]) == N
        # Not vacuous: the run moved on after the checkpoint it resumed from.
        assert differences(checkpoint.load(root / f"{case}-resumed", K, rank)["model"], b["model"])


HOOKS = [
    ("acpsgd", {}, 2),
    ("powersgd", {"rank": 2}, 2),
    ("signsgd", {}, 2),
    ("randomk", {}, 2),  # with the run's momentum as DGC momentum correction: velocity and masks
    ("doublesqueeze", {"compressor": "topk"}, 2),  # sharded: worker and server residuals
]


def test_hook_methods_resume_exactly(tmp_path: Path) -> None:
    run_workers(_runs, 2, HOOKS, str(tmp_path), _ports(3 * len(HOOKS)), init=False, timeout=400)
    for case in range(len(HOOKS)):
        _check_exact(tmp_path, case, 2)
    # keep=2 (the default): of the checkpoints at 6 and 12, both remain; the interrupted run's too.
    assert sorted(p.name for p in (tmp_path / "0-straight").iterdir()) == ["step-00000006", "step-00000012"]


GOSSIP = [("powergossip", {"topology": "ring"}, 3), ("choco", {"topology": "ring"}, 3)]


def test_gossip_methods_resume_exactly(tmp_path: Path) -> None:
    run_workers(_runs, 3, GOSSIP, str(tmp_path), _ports(3 * len(GOSSIP)), init=False, timeout=400)
    for case in range(len(GOSSIP)):
        _check_exact(tmp_path, case, 3)


def test_dedicated_servers_resume_exactly(tmp_path: Path) -> None:
    """Two workers and two servers: the servers' residuals travel in worker 0's checkpoint and back."""
    cases = [("doublesqueeze", {"placement": "server", "servers": 2, "compressor": "randomk"}, 2)]
    run_workers(_runs, 4, cases, str(tmp_path), _ports(3), init=False, timeout=400)
    _check_exact(tmp_path, 0, 2)
    servers = checkpoint.load(tmp_path / "0-resumed", N, 0)["exchange"]["servers"]
    assert len(servers) == 2 and all(s["residuals"] for s in servers)  # both servers' state, non-empty


def test_asynchronous_servers_resume_exactly_with_one_worker(tmp_path: Path) -> None:
    """One worker: the asynchronous run has one arrival order, so its resume must be bit-identical too."""
    run_workers(_runs, 2, [("doublesqueeze-async", {}, 1)], str(tmp_path), _ports(3), init=False, timeout=400)
    _check_exact(tmp_path, 0, 1)


def test_asynchronous_checkpoints_are_a_barrier_that_every_worker_agrees_with(tmp_path: Path) -> None:
    """Two workers: at a checkpoint every worker has pushed exactly its steps up to it, and the server's copy
    of each worker's model is that worker's model; a resume continues the servers' state (its push count)."""
    cases = [("doublesqueeze-async", {"compressor": "topk"}, 2)]
    run_workers(_runs, 3, cases, str(tmp_path), _ports(3), init=False, timeout=400)
    for name in ("straight", "resumed"):
        at_k = checkpoint.load(tmp_path / f"0-{name}", K, 0)["exchange"]["servers"][0]
        assert at_k["clocks"] == [K, K] and at_k["version"] == 2 * K, name
        for rank in range(2):
            model = checkpoint.load(tmp_path / f"0-{name}", K, rank)["model"]
            for held, (key, p) in zip(at_k["held"][rank], model.items(), strict=True):
                torch.testing.assert_close(held, p.reshape(-1), rtol=0, atol=1e-6, msg=f"{name} {rank} {key}")
    # Restored, not restarted: the resumed servers counted the pushes before the checkpoint too.
    assert checkpoint.load(tmp_path / "0-resumed", N, 0)["exchange"]["servers"][0]["version"] == 2 * N


def _tampered(rank: int, world: int, root: str, port: int) -> None:
    """The negative control: resume from a checkpoint whose error-feedback residuals were zeroed."""
    os.environ["MASTER_PORT"] = str(port)
    cfg = TrainConfig(
        method="acpsgd", workers=2, steps=N, quiet=True, backend="gloo", checkpoint_dir=f"{root}/9-resumed",
        checkpoint_every=K, resume=True,
    )  # fmt: skip
    run_worker(cfg)


def test_the_method_state_is_what_makes_a_resume_exact(tmp_path: Path) -> None:
    run_workers(_runs, 2, HOOKS[:1], str(tmp_path), _ports(3), init=False, timeout=400)
    # The same interrupted run, with the method's residuals zeroed in the checkpoint it resumes from.
    source, copy = tmp_path / "0-resumed", tmp_path / "9-resumed"
    copy.mkdir()
    step_k = checkpoint.step_dir(copy, K)
    step_k.mkdir()
    for name in ("meta.json", "rank0.pt", "rank1.pt"):
        (step_k / name).write_bytes((checkpoint.step_dir(source, K) / name).read_bytes())
    for rank in range(2):
        state = checkpoint.load(copy, K, rank)
        residuals = state["exchange"]["hook"]["reducer"]["residuals"]
        assert residuals and any(bool(t.any()) for t in residuals.values())
        for t in residuals.values():
            t.zero_()
        checkpoint.save(copy, K, rank, state)
    run_workers(_tampered, 2, str(tmp_path), free_port(), init=False, timeout=200)
    straight = checkpoint.load(tmp_path / "0-straight", N, 0)
    assert differences(straight["model"], checkpoint.load(copy, N, 0)["model"])


# ------------------------------------------------------------------------------------------ refusals


def _short_run(rank: int, world: int, root: str, port: int) -> None:
    os.environ["MASTER_PORT"] = str(port)
    run_worker(
        TrainConfig(method="acpsgd", workers=2, steps=4, quiet=True, backend="gloo", checkpoint_dir=root)
    )


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(["train", "--backend", "gloo", "--quiet", *argv])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    _, err = capsys.readouterr()
    return code, err


def test_another_runs_or_a_broken_checkpoint_is_refused_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "ck"
    run_workers(_short_run, 2, str(root), free_port(), init=False, timeout=200)
    assert checkpoint.steps_with(root, 0) == [4]  # after the last step
    resume = ["--resume", "--checkpoint-dir", str(root), "--steps", "8"]
    for argv, needle in [
        (["--method", "powersgd"], "method was 'acpsgd', this run has 'powersgd'"),
        (["--method", "acpsgd", "--rank", "2"], "options was"),
        (["--method", "acpsgd", "--workers", "3"], "workers was 2, this run has 3"),
        (["--method", "acpsgd", "--model", "cnn"], "model was 'mlp'"),
        (["--method", "acpsgd", "--steps", "2"], "is past this run's 2 steps"),
    ]:
        code, err = _cli([*resume, *argv], capsys)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, (argv, err)
    # Truncated, as by a crash of the disk (a crash of the process cannot do it: files are renamed into place).
    path = checkpoint.rank_file(root, 4, 1)
    path.write_bytes(path.read_bytes()[:100])
    code, err = _cli([*resume, "--method", "acpsgd"], capsys)
    assert code == 2 and "cannot be read" in err and "Traceback" not in err, err
    code, err = _cli(["--checkpoint-every", "3"], capsys)
    assert code == 2 and "need checkpoint_dir" in err
    code, err = _cli(["--max-restarts", "2"], capsys)
    assert code == 2 and "max_restarts needs checkpoint_dir" in err


def _agree(rank: int, world: int, root: str) -> int | None:
    return checkpoint.agreed_step(Path(root))


def test_the_resumed_step_is_the_latest_every_worker_holds(tmp_path: Path) -> None:
    # Rank 1 died while writing step 20: its file is missing (a temporary one is left), rank 0's is there.
    for step, ranks in [(10, (0, 1)), (20, (0,))]:
        for rank in ranks:
            checkpoint.save(tmp_path, step, rank, {"step": step})
    (checkpoint.step_dir(tmp_path, 20) / ".rank1.pt.abc").write_bytes(b"half a file")
    assert run_workers(_agree, 2, str(tmp_path)) == [10, 10]
    checkpoint.save(tmp_path, 20, 1, {"step": 20})
    assert run_workers(_agree, 2, str(tmp_path)) == [20, 20]


# ------------------------------------------------------------------------------------------ crashes


def _killed_at(cfg: TrainConfig) -> Any:
    """``run_worker``, except that rank 1 kills itself with SIGKILL as its step 8 begins: in the first attempt
    only when GRADZIP_TEST_KILL_ONCE is set (the launcher then restarts every worker), else in every one."""
    import signal

    import gradzip.train.worker as worker

    once = os.environ.get("GRADZIP_TEST_KILL_ONCE") == "1"
    first = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if os.environ["RANK"] == "1" and (first or not once):
        run_steps = worker.run_steps

        def dying(ex: Any, batches: Any, *args: Any, **kwargs: Any) -> Any:
            start = len(kwargs["result"].records) if kwargs.get("result") is not None else 0

            def until_step_8() -> Any:
                for step, batch in enumerate(batches, start=start):
                    if step == 8:
                        os.kill(os.getpid(), signal.SIGKILL)
                    yield batch

            return run_steps(ex, until_step_8(), *args, **kwargs)

        worker.run_steps = dying  # type: ignore[assignment]
    return run_worker(cfg)


def test_a_killed_worker_restarts_from_the_checkpoint_and_the_run_ends_as_if_uninterrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gradzip.train.launch import spawn

    common = {"method": "acpsgd", "workers": 2, "steps": N, "quiet": True, "backend": "gloo", "timeout": 60}
    spawn(TrainConfig(**common, checkpoint_dir=str(tmp_path / "straight"), checkpoint_every=K))  # type: ignore[arg-type]
    monkeypatch.setenv("GRADZIP_TEST_KILL_ONCE", "1")
    cfg = TrainConfig(**common, checkpoint_dir=str(tmp_path / "killed"), checkpoint_every=K, max_restarts=1)  # type: ignore[arg-type]
    summary = spawn(cfg, _killed_at)
    assert summary is not None and summary.steps == N and len(summary.history) == N
    for rank in range(2):
        a, b = (checkpoint.load(tmp_path / name, N, rank) for name in ("straight", "killed"))
        for part in ("model", "optimizer", "exchange"):
            assert not differences(a[part], b[part]), (rank, part)
    # Not vacuous: without restarts the same death ends the run, naming the rank that died.
    from gradzip.train.launch import WorkerError

    monkeypatch.delenv("GRADZIP_TEST_KILL_ONCE")
    with pytest.raises(WorkerError, match="worker rank 1 failed: killed by signal SIGKILL"):
        spawn(TrainConfig(**common, checkpoint_dir=str(tmp_path / "dead"), checkpoint_every=K), _killed_at)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("method", "options", "processes"),
    [("acpsgd", {}, 2), ("doublesqueeze", {"placement": "server"}, 3), ("powergossip", {}, 2)],
    ids=["hook", "servers", "gossip"],
)
def test_without_restarts_a_dead_worker_ends_every_kind_of_run_naming_it(
    method: str, options: dict[str, Any], processes: int
) -> None:
    import time

    from gradzip.train.launch import WorkerError, spawn

    cfg = TrainConfig(
        method=method, options=options, workers=2, steps=N, quiet=True, backend="gloo", timeout=30
    )
    start = time.monotonic()
    with pytest.raises(WorkerError, match="worker rank 1 failed: killed by signal SIGKILL"):
        spawn(cfg, _killed_at)
    assert time.monotonic() - start < 30  # the survivors are stopped: no wait for the timeout


def _stalls_at_step_5(cfg: TrainConfig) -> Any:
    """``run_worker``, except that rank 1 stops answering (sleeps for an hour) as its step 5 begins."""
    import time

    import gradzip.train.worker as worker

    if os.environ["RANK"] == "1":
        run_steps = worker.run_steps

        def stalling(ex: Any, batches: Any, *args: Any, **kwargs: Any) -> Any:
            def until_step_5() -> Any:
                for step, batch in enumerate(batches):
                    if step == 5:
                        time.sleep(3600)
                    yield batch

            return run_steps(ex, until_step_5(), *args, **kwargs)

        worker.run_steps = stalling  # type: ignore[assignment]
    return run_worker(cfg)


@pytest.mark.parametrize(
    ("method", "options"),
    [("acpsgd", {}), ("doublesqueeze", {"placement": "server"}), ("powergossip", {})],
    ids=["hook", "servers", "gossip"],
)
def test_a_worker_that_stops_answering_is_named_within_the_timeout(
    method: str, options: dict[str, Any]
) -> None:
    import time

    from gradzip.train.launch import WorkerError, spawn

    cfg = TrainConfig(
        method=method, options=options, workers=2, steps=N, quiet=True, backend="gloo", timeout=3
    )
    start = time.monotonic()
    with pytest.raises(WorkerError, match="worker rank 1 stopped answering") as info:
        spawn(cfg, _stalls_at_step_5)
    assert info.value.rank == 1
    assert time.monotonic() - start < 30  # the timeout, the roll call, the launcher stopping the rest
