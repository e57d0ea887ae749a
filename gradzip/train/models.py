"""The model zoo: small models for the embedded data, and real architectures for benchmarks.

``build_model(name, input_shape, num_classes)`` builds any entry of ``MODELS``:

* ``mlp``: flatten -> 128 -> 128 -> classes (ReLU); the default for ``digits`` (26,122 parameters there).
* ``cnn``: two 3x3 conv layers (16, 32 channels) + pooling + a linear head; any [C, H, W] of at least 8x8.
* ``cnn1d``: three 1-D conv layers of 25 channels (kernels 5, 3, 3, stride 2, padding 1, ReLU) + a linear
  head, the shape of MNIST-1D's published CNN baseline; any [C, L] with L >= 3 (5,210 parameters on mnist1d).
* ``wide_mlp``: flatten -> 4 hidden layers of 2048 -> classes. Few FLOPs per parameter, so communication
  dominates a step: 12,742,666 parameters on 1x8x8 digits, 18,903,050 on 3x32x32 (10 classes).
* ``resnet18`` / ``resnet50`` / ``resnet152``: torchvision's ResNets, module names and parameter shapes
  included (BasicBlock [2,2,2,2]; v1.5 Bottleneck [3,4,6,3] and [3,8,36,3]); with 1000 classes at 224x224
  they have 11,689,512 / 25,557,032 / 60,192,808 parameters. For inputs under 64 pixels high the stem is a
  3x3 stride-1 conv with no max-pool (the usual CIFAR adaptation: the 7x7 stride-2 stem plus pool would
  shrink 32x32 to 8x8 before the first block); only the stem conv's shape changes.
* ``bert_tiny`` / ``bert_base`` / ``bert_large``: BERT encoders + tanh pooler + linear classifier on token
  ids [B, seq]. ``input_shape`` is ``(seq_len,)``; an image shape is ignored, so any data set's shape may be
  passed. Without the classifier, base and large have exactly HF ``BertModel``'s 109,482,240 and
  335,141,888 parameters. ``bert_tiny`` (hidden 128, 2 layers, 2 heads, full vocab) is for quick runs; any
  size can be built with ``Bert(BertConfig(...), num_classes)``.

Every model is initialised from the global torch RNG only, so ``torch.manual_seed`` makes it deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BERT_CONFIGS",
    "MODELS",
    "MLP",
    "BasicBlock",
    "Bert",
    "BertConfig",
    "Bottleneck",
    "ResNet",
    "SmallCNN",
    "SmallCNN1d",
    "build_bert",
    "build_model",
]


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _sequence_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int]:
    if len(input_shape) != 2:
        raise ValueError(
            f"model {name!r} needs a sequence input shape (C, L), e.g. (1, 40) for mnist1d, "
            f"got {tuple(input_shape)}"
        )
    c, length = input_shape
    return c, length


def _image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(f"model {name!r} needs an image input shape (C, H, W), got {tuple(input_shape)}")
    c, h, w = input_shape
    return c, h, w


# ----------------------------------------------------------------------------------------------- MLPs


class MLP(nn.Module):
    """Flatten, then Linear+ReLU for each hidden width, then a linear classifier."""

    def __init__(self, in_features: int, hidden: list[int], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return MLP(_numel(input_shape), [128, 128], num_classes)


def _wide_mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return MLP(_numel(input_shape), [2048] * 4, num_classes)


# ------------------------------------------------------------------------------------------------ CNN


class SmallCNN(nn.Module):
    """conv3x3(16)-ReLU-maxpool2, conv3x3(32)-ReLU, adaptive average pool to 4x4, linear head.

    The adaptive pool fixes the head's width at 32*4*4 whatever the input size, so one definition serves
    8x8 digits, 28x28 MNIST and 32x32 CIFAR.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Linear(32 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


def _cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    c, h, w = _image_shape("cnn", input_shape)
    if h < 8 or w < 8:
        raise ValueError(f"model 'cnn' needs inputs of at least 8x8 pixels, got {h}x{w}")
    return SmallCNN(c, num_classes)


class SmallCNN1d(nn.Module):
    """Three strided 1-D convolutions (25 channels; kernels 5, 3, 3; stride 2; padding 1), each followed by
    ReLU, then a linear layer from the flattened features to the classes.

    Each conv roughly halves the length (40 -> 19 -> 10 -> 5 on MNIST-1D), so the head reads 25 * 5 features.
    """

    channels = 25
    kernels = (5, 3, 3)

    def __init__(self, in_channels: int, length: int, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_channels
        for k in self.kernels:
            layers += [nn.Conv1d(width, self.channels, k, stride=2, padding=1), nn.ReLU(inplace=True)]
            width = self.channels
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(self.channels * self.out_length(length), num_classes)

    @classmethod
    def out_length(cls, length: int) -> int:
        """The length after the three convs (< 1: too short an input)."""
        for k in cls.kernels:
            length = (length + 2 - k) // 2 + 1
        return length

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


def _cnn1d(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    c, length = _sequence_shape("cnn1d", input_shape)
    if c < 1 or SmallCNN1d.out_length(length) < 1:
        raise ValueError(
            f"model 'cnn1d' needs at least 1 channel and a length of at least 3, got {tuple(input_shape)}"
        )
    return SmallCNN1d(c, length, num_classes)


# --------------------------------------------------------------------------------------------- ResNet


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv), as in torchvision."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(cin, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, width * self.expansion)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet with torchvision's module layout and parameter shapes (and its default initialisation)."""

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: list[int],
        in_channels: int = 3,
        num_classes: int = 1000,
        small_input: bool = False,
    ) -> None:
        super().__init__()
        self.inplanes = 64
        if small_input:
            self.conv1: nn.Conv2d = _conv3x3(in_channels, 64)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], width: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample: nn.Module | None = None
        if stride != 1 or self.inplanes != width * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, width * block.expansion, stride),
                nn.BatchNorm2d(width * block.expansion),
            )
        layers: list[nn.Module] = [block(self.inplanes, width, stride, downsample)]
        self.inplanes = width * block.expansion
        layers += [block(self.inplanes, width) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _resnet(
    name: str, block: type[BasicBlock | Bottleneck], layers: list[int]
) -> Callable[[tuple[int, ...], int], nn.Module]:
    def build(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        c, h, _ = _image_shape(name, input_shape)
        return ResNet(block, layers, in_channels=c, num_classes=num_classes, small_input=h < 64)

    return build


# ----------------------------------------------------------------------------------------------- BERT


@dataclass(frozen=True)
class BertConfig:
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    vocab: int = 30522
    max_pos: int = 512
    type_vocab: int = 2
    # None means the usual 4 * hidden.
    intermediate: int | None = None
    dropout: float = 0.1
    layer_norm_eps: float = 1e-12

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(
                f"hidden={self.hidden} is invalid: hidden must be a multiple of heads={self.heads}"
            )

    @property
    def ffn(self) -> int:
        return self.intermediate if self.intermediate is not None else 4 * self.hidden


BERT_CONFIGS: dict[str, BertConfig] = {
    "bert_tiny": BertConfig(hidden=128, layers=2, heads=2),
    "bert_base": BertConfig(hidden=768, layers=12, heads=12),
    "bert_large": BertConfig(hidden=1024, layers=24, heads=16),
}


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        # Separate projections (not a packed in_proj) so each is its own gradient tensor, as in BERT.
        self.query = nn.Linear(cfg.hidden, cfg.hidden)
        self.key = nn.Linear(cfg.hidden, cfg.hidden)
        self.value = nn.Linear(cfg.hidden, cfg.hidden)
        self.out = nn.Linear(cfg.hidden, cfg.hidden)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, s, h = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, self.heads, h // self.heads).transpose(1, 2)

        ctx = F.scaled_dot_product_attention(
            split(self.query(x)),
            split(self.key(x)),
            split(self.value(x)),
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out(ctx.transpose(1, 2).reshape(b, s, h))


class BertLayer(nn.Module):
    """Post-LayerNorm encoder layer: x = LN(x + attn(x)); x = LN(x + FFN(x))."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attention = BertSelfAttention(cfg)
        self.attn_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.intermediate = nn.Linear(cfg.hidden, cfg.ffn)
        self.output = nn.Linear(cfg.ffn, cfg.hidden)
        self.ffn_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attn_norm(x + self.dropout(self.attention(x, mask)))
        return self.ffn_norm(x + self.dropout(self.output(F.gelu(self.intermediate(x)))))


class Bert(nn.Module):
    """BERT encoder (embeddings, layers, tanh pooler over [CLS]) with a linear classification head.

    The layout matches HF ``BertModel`` tensor for tensor (without the classifier), so gradient sizes and
    counts are those of real BERT fine-tuning.
    """

    def __init__(self, cfg: BertConfig, num_classes: int) -> None:
        super().__init__()
        self.config = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab, cfg.hidden)
        self.position_embeddings = nn.Embedding(cfg.max_pos, cfg.hidden)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab, cfg.hidden)
        self.embed_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.layers))
        self.pooler = nn.Linear(cfg.hidden, cfg.hidden)
        self.classifier = nn.Linear(cfg.hidden, num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # BERT's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm.
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``input_ids`` [B, seq] -> logits [B, num_classes]; ``attention_mask`` [B, seq] is 1 for real tokens."""
        _, seq = input_ids.shape
        if seq > self.config.max_pos:
            raise ValueError(f"sequence length {seq} exceeds max_pos={self.config.max_pos}")
        positions = torch.arange(seq, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        x = self.dropout(self.embed_norm(x))
        # SDPA takes a boolean mask broadcast over heads and query positions: True = may attend.
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        pooled = torch.tanh(self.pooler(x[:, 0]))
        return self.classifier(self.dropout(pooled))


def build_bert(cfg: BertConfig, num_classes: int) -> Bert:
    return Bert(cfg, num_classes)


def _bert(name: str) -> Callable[[tuple[int, ...], int], nn.Module]:
    cfg = BERT_CONFIGS[name]

    def build(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        # A 1-D shape is (seq_len,); anything else is an image shape from the data set and is ignored.
        if len(input_shape) == 1 and input_shape[0] > cfg.max_pos:
            raise ValueError(f"model {name!r}: seq_len={input_shape[0]} exceeds max_pos={cfg.max_pos}")
        return Bert(cfg, num_classes)

    return build


# ------------------------------------------------------------------------------------------- registry

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": _mlp,
    "cnn": _cnn,
    "cnn1d": _cnn1d,
    "wide_mlp": _wide_mlp,
    "resnet18": _resnet("resnet18", BasicBlock, [2, 2, 2, 2]),
    "resnet50": _resnet("resnet50", Bottleneck, [3, 4, 6, 3]),
    "resnet152": _resnet("resnet152", Bottleneck, [3, 8, 36, 3]),
    "bert_tiny": _bert("bert_tiny"),
    "bert_base": _bert("bert_base"),
    "bert_large": _bert("bert_large"),
}


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build registry model ``name`` for inputs of ``input_shape`` (without the batch dim)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: valid models are {', '.join(MODELS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes} is invalid: num_classes must be >= 1")
    return MODELS[name](tuple(input_shape), num_classes)
