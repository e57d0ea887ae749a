"""Plans of every method on a synthetic profile: buckets, bytes, the orderings the model must get right."""

from __future__ import annotations

import pytest

from gradzip.sim import calibrate
from gradzip.sim.grid import DEFAULT_METHODS, advise, markdown, simulate_grid
from gradzip.sim.network import Link
from gradzip.sim.plans import PLANS, Cluster, ddp_buckets, plan
from gradzip.sim.predict import predict
from gradzip.sim.profile import Layer, ModelProfile

KERNELS = {
    "sign": 2e-9, "topk": 3e-9, "randomk": 6e-9, "qsgd": 2e-9, "fp16": 1e-9, "powersgd": 3e-9, "acpsgd": 2.5e-9,
}  # fmt: skip


def profile(layers: int = 8, rows: int = 1024, cols: int = 1024) -> ModelProfile:
    """An MLP-like model: matrices with their biases, 20 ms of backward each."""
    out = []
    for i in range(layers):
        out += [Layer(f"l{i}.bias", (rows,), 0.0), Layer(f"l{i}.weight", (rows, cols), 0.02)]
    return ModelProfile(
        "synthetic", "test", 32, 0.05, 0.01, out, dict(KERNELS),
        {"signsgd": 3e-10, "topk": 3e-10, "qsgd": 3e-10}, copy_bytes_per_s=5e9,
    )  # fmt: skip


def test_ddp_buckets_close_once_full() -> None:
    layers = [Layer(str(i), (2**18,), 0.0) for i in range(10)]  # 1 MiB each
    assert ddp_buckets(layers, 3.0) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert ddp_buckets(layers, 2.5) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert ddp_buckets(layers, 100.0) == [list(range(10))]


@pytest.mark.parametrize("method", DEFAULT_METHODS)
def test_every_method_predicts_a_step_no_shorter_than_its_compute(method: str) -> None:
    p = profile()
    pred = predict(p, method, Cluster(8, Link(1e9)))
    assert pred.iteration_s >= p.forward_s + p.backward_s + p.optimizer_s
    assert pred.sent_bytes > 0
    assert pred.wire


def test_bytes_are_what_each_worker_puts_on_its_link() -> None:
    from gradzip.compress.fusion import ByteLayout
    from gradzip.config import make_compressor

    p = profile()
    c = Cluster(4, Link(1e9))
    ring = 2 * 3 / 4  # a ring all-reduce moves 2(n-1)/n of its tensor through each worker
    matrices = sum(layer.numel for layer in p.layers if len(layer.shape) == 2)
    raw = sum(layer.numel for layer in p.layers if len(layer.shape) == 1)  # biases: never compressed
    assert predict(p, "ssgd", c).sent_bytes == pytest.approx(ring * 4 * (matrices + raw))
    assert predict(p, "fp16", c).sent_bytes == pytest.approx(ring * (2 * matrices + 4 * raw))
    # Sign: an all-gather passes the 3 other workers' payloads (a bit per element and a scale, padded as
    # the reducer lays it out); the biases go raw in an all-reduce beside it.
    sign = make_compressor("signsgd")
    payload = sum(
        ByteLayout(sign.payload_spec(layer.numel)).nbytes for layer in p.layers if len(layer.shape) == 2
    )
    assert predict(p, "signsgd", c).sent_bytes == pytest.approx(3 * payload + ring * 4 * raw)
    # PowerSGD sends P (with the raw tensors) and Q; ACP-SGD one of them per step, the raw tensors each time.
    factor = 8 * 4 * 4 * 1024  # 8 matrices, rank 4, 1024 rows (or columns), 4 bytes
    assert predict(p, "powersgd", c).sent_bytes == pytest.approx(ring * (2 * factor + 4 * raw))
    assert predict(p, "acpsgd", c).sent_bytes == pytest.approx(ring * (factor + 4 * raw))


def test_a_servers_work_is_priced_alone_on_its_cores_and_a_pull_decodes_densely() -> None:
    import dataclasses

    dense = {"signsgd.encode": 1e-9, "signsgd.decode": 5e-9}
    p = dataclasses.replace(profile(), standalone_s_per_element=dense)
    c = Cluster(4, Link(1e9))
    alone = plan("doublesqueeze-async", p, c).exchange
    assert alone is not None
    # The worker's pull decodes one payload into a fresh tensor: the dense decode, not the fused accumulate.
    assert alone.after_s == pytest.approx(5e-9 * p.numel + 4 * p.numel / p.copy_bytes_per_s)
    # A profile of 4 copies sharing 2 cores prices each copy at half a core; the server, working while its
    # workers wait, has a core of its own: its work costs half, its busy bound too. Not so for the worker.
    shared = dataclasses.replace(p, processes=4, cores=2)
    assert shared.lone_speedup == 2.0 and p.lone_speedup == 1.0
    half = plan("doublesqueeze-async", shared, c)
    assert half.exchange is not None
    assert half.exchange.server_s == pytest.approx(alone.server_s / 2)
    assert half.server_busy_s == pytest.approx(plan("doublesqueeze-async", p, c).server_busy_s / 2)
    assert half.exchange.after_s == pytest.approx(alone.after_s)
    # Copies that did not contend (as many as the cores) leave the price as measured; servers together get
    # no more than the whole machine (4 copies' worth here, not 3 x 2); a derived profile drops the factor.
    assert dataclasses.replace(p, processes=2, cores=2).lone_speedup == 1.0
    three = plan("doublesqueeze-async", shared, c, {"servers": 3}).exchange
    alone3 = plan("doublesqueeze-async", p, c, {"servers": 3}).exchange
    assert three is not None and alone3 is not None
    assert three.server_s == pytest.approx(alone3.server_s * 3 / 4)
    assert shared.scaled(2.0, 2.0, "gpu").lone_speedup == 1.0


def test_the_orderings_the_paper_reports() -> None:
    p = profile()
    slow, fast = Cluster(16, Link(1e9)), Cluster(16, Link(100e9))
    t = {m: predict(p, m, slow).iteration_s for m in ("ssgd", "powersgd", "acpsgd", "signsgd")}
    # On a slow link low-rank methods beat ssgd, and ACP-SGD (one pipelined round) beats PowerSGD.
    assert t["acpsgd"] < t["powersgd"] < t["ssgd"]
    # All-gather grows with the worker count: sign loses its edge over ssgd from 4 to 64 workers.
    gain = [
        predict(p, "ssgd", Cluster(n, Link(1e9))).iteration_s
        / predict(p, "signsgd", Cluster(n, Link(1e9))).iteration_s
        for n in (4, 64)
    ]
    assert gain[0] > gain[1]
    # On a fast link ssgd's communication hides behind backward: compression no longer pays.
    assert predict(p, "ssgd", fast).iteration_s < predict(p, "topk", fast).iteration_s


def test_every_registry_method_has_a_plan() -> None:
    from gradzip.registry import methods

    assert set(methods()) <= set(PLANS)
    assert set(DEFAULT_METHODS) == set(methods())


def test_unknown_method_and_missing_kernel_are_named() -> None:
    p = profile()
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        plan("nope", p, Cluster(4, Link(1e9)))
    bare = ModelProfile("m", "test", 1, 0.0, 0.0, p.layers)
    with pytest.raises(ValueError, match="no kernel cost for 'acpsgd'"):
        plan("acpsgd", bare, Cluster(4, Link(1e9)))
    with pytest.raises(ValueError, match="workers=1"):
        Cluster(1, Link(1e9))


def test_grid_table_and_advice() -> None:
    p = profile()
    preds = simulate_grid(p, ["acpsgd", "powersgd:rank=8"], [8, 16], ["1gbit", "10gbit"])
    assert {x.method for x in preds} == {"ssgd", "acpsgd", "powersgd:rank=8"}
    table = markdown(preds, p)
    assert "| acpsgd |" in table and "8 x 1gbit" in table
    advice = advise(p, 16, "1gbit", ["ssgd", "acpsgd", "powersgd", "topk"])
    assert [x.iteration_s for x in advice.ranking] == sorted(x.iteration_s for x in advice.ranking)
    assert advice.reason.startswith(f"{advice.ranking[0].method} wins")
    assert advice.ranking[1].method in advice.reason


def test_calibration_fit_recovers_alpha_and_beta() -> None:
    n, alpha, beta = 4, 2e-4, 1e8
    sizes = [1e3, 1e5, 1e6, 4e6]
    seconds = [2 * (n - 1) * alpha + 2 * (n - 1) / n * s / beta for s in sizes]
    a, b = calibrate.fit(sizes, seconds, n)
    assert a == pytest.approx(alpha) and b == pytest.approx(beta)


def test_profile_round_trips_and_a_bad_file_is_named(tmp_path) -> None:
    p = profile()
    p.save(tmp_path / "p.json")
    assert ModelProfile.load(tmp_path / "p.json") == p
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json' is not a gradzip profile"):
        ModelProfile.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="does not exist"):
        ModelProfile.load(tmp_path / "missing.json")
    derived = p.scaled(compute=10.0, memory=2.0, device="gpu", batch_size=64, why="test")
    assert derived.source == "derived: test" and derived.backward_s == pytest.approx(p.backward_s * 2 / 10)
