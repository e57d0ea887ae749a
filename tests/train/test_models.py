"""The model zoo: every model builds and runs, the big ones have their published parameter counts."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from gradzip.train.data import load_dataset
from gradzip.train.models import MODELS, Bert, BertConfig, build_model


def _count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


IMAGE_CASES = [
    (name, shape)
    for shape in [(1, 8, 8), (3, 32, 32)]
    for name in ["mlp", "cnn", "wide_mlp", "resnet18", "resnet50"]
    # ResNet-50 at 32x32 with the stride-1 stem is ~1 GFLOP per image: the 8x8 case covers its code.
    if not (name == "resnet50" and shape[1] == 32)
]


@pytest.mark.parametrize(("name", "shape"), IMAGE_CASES)
def test_image_models_forward(name: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = build_model(name, shape, 10)
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_resnet_on_imagenet_sized_input() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", (3, 224, 224), 7).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 7)


@pytest.mark.parametrize(
    ("name", "params"),
    [("resnet18", 11_689_512), ("resnet50", 25_557_032), ("resnet152", 60_192_808)],
)
def test_resnet_parameter_counts_match_torchvision(name: str, params: int) -> None:
    model = build_model(name, (3, 224, 224), 1000)
    assert _count(model) == params
    # The ImageNet stem; small inputs get the 3x3 one instead (and nothing else changes).
    conv1 = model.get_submodule("conv1")
    assert isinstance(conv1, nn.Conv2d) and conv1.weight.shape == (64, 3, 7, 7)
    with torch.device("meta"):
        small = build_model(name, (3, 32, 32), 1000)
    assert _count(small) == params - 64 * 3 * (7 * 7 - 3 * 3)


def test_resnet50_tensor_shapes() -> None:
    shapes = {k: tuple(v.shape) for k, v in build_model("resnet50", (3, 224, 224), 1000).state_dict().items()}
    # A few of torchvision's state-dict keys and shapes, including a v1.5 strided 3x3 and a downsample.
    assert shapes["layer2.0.conv2.weight"] == (128, 128, 3, 3)
    assert shapes["layer3.0.downsample.0.weight"] == (1024, 512, 1, 1)
    assert shapes["layer4.2.conv3.weight"] == (2048, 512, 1, 1)
    assert shapes["fc.weight"] == (1000, 2048)
    assert shapes["bn1.running_mean"] == (64,)


def test_wide_mlp_size() -> None:
    assert _count(build_model("wide_mlp", (1, 8, 8), 10)) == 12_742_666
    assert _count(build_model("wide_mlp", (3, 32, 32), 10)) == 18_903_050


def _bert_model_count(h: int, layers: int, vocab: int = 30522, max_pos: int = 512) -> int:
    """HF BertModel's parameter count: embeddings + layers + pooler (no classifier)."""
    embeddings = (vocab + max_pos + 2) * h + 2 * h
    layer = 4 * (h * h + h) + 2 * h + (h * 4 * h + 4 * h) + (4 * h * h + h) + 2 * h
    return embeddings + layers * layer + h * h + h


def test_bert_base_parameter_count() -> None:
    assert _bert_model_count(768, 12) == 109_482_240
    model = build_model("bert_base", (128,), 2)
    assert _count(model) == 109_482_240 + 768 * 2 + 2


def test_bert_large_parameter_count() -> None:
    # Built on the meta device: the same modules without allocating 1.3 GB or initialising them.
    with torch.device("meta"):
        model = build_model("bert_large", (128,), 2)
    assert _bert_model_count(1024, 24) == 335_141_888
    assert _count(model) == 335_141_888 + 1024 * 2 + 2
    assert isinstance(model, Bert) and len(model.layers) == 24 and model.config.heads == 16


def test_bert_tiny_forward_and_mask() -> None:
    torch.manual_seed(0)
    cfg = BertConfig(hidden=32, layers=2, heads=4, vocab=100, max_pos=16)
    model = Bert(cfg, num_classes=3).eval()
    assert _count(model) - (32 * 3 + 3) == _bert_model_count(32, 2, vocab=100, max_pos=16)
    ids = torch.randint(0, 100, (4, 10))
    with torch.no_grad():
        out = model(ids)
        assert out.shape == (4, 3)
        # Padding positions masked out do not change the [CLS] result.
        mask = torch.ones(4, 10, dtype=torch.long)
        mask[:, 6:] = 0
        padded = ids.clone()
        padded[:, 6:] = 0
        a = model(ids, attention_mask=mask)
        b = model(padded, attention_mask=mask)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="max_pos"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_registry_bert_ignores_image_shape() -> None:
    torch.manual_seed(0)
    model = build_model("bert_tiny", (1, 8, 8), 10).eval()
    with torch.no_grad():
        assert model(torch.randint(0, 30522, (2, 12))).shape == (2, 10)
    with pytest.raises(ValueError, match="seq_len"):
        build_model("bert_tiny", (1024,), 10)


def test_bert_config_validates() -> None:
    with pytest.raises(ValueError, match="multiple of heads"):
        BertConfig(hidden=30, heads=4)


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'resnet9'.*mlp.*resnet50.*bert_base"):
        build_model("resnet9", (1, 8, 8), 10)


def test_image_model_rejects_token_shape() -> None:
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        build_model("cnn", (128,), 10)


def test_registry_complete() -> None:
    expected = {
        "mlp",
        "cnn",
        "cnn1d",
        "wide_mlp",
        "resnet18",
        "resnet50",
        "resnet152",
        "bert_base",
        "bert_large",
    }
    assert expected <= set(MODELS)


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet18", "bert_tiny"])
def test_models_deterministic_given_seed(name: str) -> None:
    shape = (1, 8, 8)
    torch.manual_seed(123)
    a = build_model(name, shape, 10).state_dict()
    torch.manual_seed(123)
    b = build_model(name, shape, 10).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(124)
    c = build_model(name, shape, 10).state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point() and a[k].numel() > 1)


def test_mlp_trains_on_digits() -> None:
    torch.manual_seed(0)
    ds = load_dataset("digits", seed=0)
    model = build_model("mlp", ds.input_shape, ds.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    # Three epochs reach ~98%; the bar is lower so the test is about "it learns", not about tuning.
    for _ in range(3):
        for idx in torch.randperm(len(ds.x_train), generator=g).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(ds.x_train[idx]), ds.y_train[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(ds.x_test).argmax(1) == ds.y_test).float().mean().item()
    assert acc > 0.85


# ---------------------------------------------------------------------------------------- cnn1d, mnist1d


def test_cnn1d_forward_and_size() -> None:
    torch.manual_seed(0)
    model = build_model("cnn1d", (1, 40), 10)
    # conv 1->25 k5 (150) + two conv 25->25 k3 (1,900 each) + linear 25*5->10 (1,260): MNIST-1D's CNN baseline.
    assert _count(model) == 5210
    with torch.no_grad():
        out = model(torch.randn(3, 1, 40))
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    # Other channel counts and lengths, down to the shortest that leaves one position after the three convs.
    assert build_model("cnn1d", (2, 3), 4)(torch.randn(1, 2, 3)).shape == (1, 4)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((1, 8, 8), r"'cnn1d' needs a sequence input shape \(C, L\).*got \(1, 8, 8\)"),
        ((40,), r"'cnn1d' needs a sequence input shape \(C, L\).*got \(40,\)"),
        ((1, 2), r"'cnn1d' needs at least 1 channel and a length of at least 3, got \(1, 2\)"),
        ((0, 40), r"'cnn1d' needs at least 1 channel.*got \(0, 40\)"),
    ],
)
def test_cnn1d_refuses_shapes_it_cannot_take(shape: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model("cnn1d", shape, 10)


def test_image_cnn_refuses_mnist1d_before_any_worker_starts() -> None:
    from gradzip.train.config import TrainConfig
    from gradzip.train.preflight import preflight

    for model in ("cnn1d", "mlp"):
        preflight(TrainConfig(model=model, dataset="mnist1d", workers=4, backend="gloo"))
    with pytest.raises(ValueError, match=r"'cnn' needs an image input shape \(C, H, W\), got \(1, 40\)"):
        preflight(TrainConfig(model="cnn", dataset="mnist1d", workers=4, backend="gloo"))


def _train_one_process(monkeypatch: pytest.MonkeyPatch, **options: Any) -> dict[str, Any]:
    """A whole ``gradzip train`` run of one worker in this process (DDP on a gloo group of one)."""
    from gradzip.train.config import TrainConfig
    from gradzip.train.worker import run_worker
    from gradzip.util import free_port

    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "GLOO_SOCKET_IFNAME": "lo"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    threads = torch.get_num_threads()
    try:
        cfg = TrainConfig(method="ssgd", workers=1, dataset="mnist1d", quiet=True, backend="gloo", **options)
        summary = run_worker(cfg)
    finally:
        torch.set_num_threads(threads)
    assert summary is not None
    return summary.to_dict()


def test_cnn1d_learns_mnist1d(monkeypatch: pytest.MonkeyPatch) -> None:
    # 600 steps of 32 reach ~80% (seeds 0-4: 68-82%; 2,000 steps of 128 reach ~93%); chance is 10%.
    summary = _train_one_process(monkeypatch, model="cnn1d", steps=600)
    assert summary["test_accuracy"] > 0.6


def test_mlp_trains_on_mnist1d(monkeypatch: pytest.MonkeyPatch) -> None:
    # The MLP flattens [1, 40]; 200 steps reach ~40% (its published ceiling is 68%).
    summary = _train_one_process(monkeypatch, model="mlp", steps=200)
    assert summary["test_accuracy"] > 0.25
