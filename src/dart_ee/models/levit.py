"""LeViT (Graham et al., 2021) with token exits: ``levit_128s``, ``levit_192`` and ``levit_256``.

Written here (timm's LeViT imports torchvision, which does not import beside this torch). It follows
the paper: a convolutional stem, three stages of attention and MLP blocks whose linear layers carry
BatchNorm, a learned attention bias per head and relative offset instead of position embeddings,
Hardswish activations, and shrinking attention between stages (queries from a stride-2 subsample of
the tokens, keys and values from all of them). Widths, depths, heads and key dimensions are the
published ones.

Changed against the 224x224 original, for 32x32 inputs: the stem keeps its four 3x3 convolutions
but only the first has stride 2 (the original has four), so stage 1 sees a 16x16 grid of tokens,
then 8x8 and 4x4 (the original: 14x14, 7x7, 4x4). With ``image_size=224`` the stem is the original
one. The distillation head of the original (trained from a teacher) is left out.

Exits (Eq 16): ``TokenHead``, an MLP on the LayerNorm of the mean token, after each half of each
stage: six exits, spread over the network's MACs (``dart-ee info --model levit_128s`` prints where
they fall; exits after whole stages only would put half of LeViT-192's compute before the first).
The last exit is LeViT's own classifier (BatchNorm and a linear layer on the mean token).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from dart_ee.models.net import MultiExitNet, _build, _norm, register_model

# name: (widths, heads, depths, key_dim) of the three stages, as published
VARIANTS: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int]] = {
    "levit_128s": ((128, 256, 384), (4, 6, 8), (2, 3, 4), 16),
    "levit_192": ((192, 288, 384), (3, 5, 6), (4, 4, 4), 32),
    "levit_256": ((256, 384, 512), (4, 6, 8), (4, 4, 4), 32),
}


class LinearBN(nn.Module):
    """A linear layer without bias and BatchNorm over its outputs, on tokens (B, N, C).

    (Not an nn.Sequential: inference optimisation flattens those, and this forward must reshape.)
    """

    def __init__(self, cin: int, cout: int, bn_weight: float = 1.0) -> None:
        super().__init__()
        self.linear, self.bn = nn.Linear(cin, cout, bias=False), nn.BatchNorm1d(cout)
        nn.init.constant_(self.bn.weight, bn_weight)  # 0 on a residual branch: each block starts as the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return self.bn(self.linear(x).flatten(0, 1)).view(b, n, -1)


def _offsets(q_points: list[tuple[int, int]], k_points: list[tuple[int, int]]) -> tuple[int, torch.Tensor]:
    """Index of each (query, key) pair's absolute offset, shared by all pairs with the same offset."""
    index: dict[tuple[int, int], int] = {}
    idx = [[index.setdefault((abs(a[0] - b[0]), abs(a[1] - b[1])), len(index)) for b in k_points] for a in q_points]
    return len(index), torch.tensor(idx, dtype=torch.long)


class Attention(nn.Module):
    """Multi-head attention with a learned bias per head and relative offset (LeViT's positional signal).

    ``stride`` 2 makes it the shrinking attention between stages: queries from every second token in
    each direction, keys and values from all, and a wider value dimension (``attn_ratio`` 4).
    """

    bias_index: torch.Tensor  # buffer, declared for the type checker

    def __init__(self, dim: int, out_dim: int, key_dim: int, heads: int, attn_ratio: int, resolution: int,
                 stride: int = 1) -> None:
        super().__init__()
        self.heads, self.key_dim, self.value_dim, self.stride = heads, key_dim, attn_ratio * key_dim, stride
        self.scale = key_dim ** -0.5
        self.resolution, self.out_resolution = resolution, (resolution - 1) // stride + 1
        if stride == 1:
            self.qkv = LinearBN(dim, heads * (2 * key_dim + self.value_dim))
        else:
            self.q = LinearBN(dim, heads * key_dim)
            self.kv = LinearBN(dim, heads * (key_dim + self.value_dim))
        self.proj = nn.Sequential(nn.Hardswish(), LinearBN(heads * self.value_dim, out_dim, 0.0 if stride == 1 else 1.0))
        k_points = list(itertools.product(range(resolution), range(resolution)))
        q_points = list(itertools.product(range(0, resolution, stride), range(0, resolution, stride)))
        n_offsets, index = _offsets(q_points, k_points)
        self.biases = nn.Parameter(torch.zeros(heads, n_offsets))
        self.register_buffer("bias_index", index, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h, kd, vd = self.heads, self.key_dim, self.value_dim
        if self.stride == 1:
            q, k, v = self.qkv(x).view(b, n, h, -1).split([kd, kd, vd], dim=3)
        else:
            r = self.resolution
            k, v = self.kv(x).view(b, n, h, -1).split([kd, vd], dim=3)
            sub = x.view(b, r, r, -1)[:, ::self.stride, ::self.stride].reshape(b, -1, x.shape[2])
            q = self.q(sub).view(b, -1, h, kd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, tokens, dim)
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.biases[:, self.bias_index]
        out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, q.shape[2], h * vd)
        return self.proj(out)


class MLP(nn.Sequential):
    def __init__(self, dim: int, ratio: int = 2) -> None:
        super().__init__(LinearBN(dim, dim * ratio), nn.Hardswish(), LinearBN(dim * ratio, dim, 0.0))


class Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Tokens(nn.Module):
    """(B, C, H, W) feature map -> (B, H*W, C) tokens."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


class MeanToken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1)


def _stem(in_channels: int, width: int, strides: Sequence[int]) -> list[nn.Module]:
    chans = [in_channels, width // 8, width // 4, width // 2, width]
    layers: list[nn.Module] = []
    for i, s in enumerate(strides):
        layers += [nn.Conv2d(chans[i], chans[i + 1], 3, s, 1, bias=False), nn.BatchNorm2d(chans[i + 1])]
        if i < len(strides) - 1:
            layers.append(nn.Hardswish())
    return layers


def _block(dim: int, key_dim: int, heads: int, resolution: int) -> list[nn.Module]:
    return [Residual(Attention(dim, dim, key_dim, heads, 2, resolution)), Residual(MLP(dim))]


def levit(spec: tuple, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, head_width: int = 128,
          mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> MultiExitNet:
    """A LeViT of ``spec`` = (widths, heads, depths, key_dim) per stage (``VARIANTS`` holds the published ones)."""
    widths, heads, depths, key_dim = spec
    strides = (2, 2, 2, 2) if image_size >= 128 else (2, 1, 1, 1)
    resolution = image_size
    for s in strides:
        resolution = (resolution - 1) // s + 1
    blocks: list[list[nn.Module]] = []  # one list of modules per stage
    for i, (dim, h, depth) in enumerate(zip(widths, heads, depths)):
        stage: list[nn.Module] = []
        if i > 0:  # shrinking attention from the previous width, then an MLP at the new one
            shrink = Attention(widths[i - 1], dim, key_dim, widths[i - 1] // key_dim, 4, resolution, stride=2)
            resolution = shrink.out_resolution
            stage += [shrink, Residual(MLP(dim))]
        for _ in range(depth):
            stage += _block(dim, key_dim, h, resolution)
        blocks.append(stage)
    # an exit after each half of each stage (the shrinking attention goes with the first half): six exits
    # spread over the MACs, where the stages alone would put half of LeViT-192's compute before the first
    halves: list[list[nn.Module]] = []
    for stage, depth in zip(blocks, depths):
        cut = len(stage) - 2 * depth + 2 * ((depth + 1) // 2)
        halves += [stage[:cut], stage[cut:]]
    halves[0] = [_norm(in_channels, mean, std), *_stem(in_channels, widths[0], strides), Tokens(), *halves[0]]
    stages = [nn.Sequential(*h) for h in halves]
    final = nn.Sequential(MeanToken(), nn.BatchNorm1d(widths[2]), nn.Linear(widths[2], num_classes))
    return _build(stages, final, num_classes, (in_channels, image_size, image_size), head_width)


def _register(name: str) -> None:
    def make(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, head_width: int = 128,
             mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
             width_mult: float = 1.0) -> MultiExitNet:
        widths, heads, depths, key_dim = VARIANTS[name]
        if width_mult != 1.0:  # narrower (tests, quick runs): widths stay multiples of the key dimension
            widths = tuple(max(key_dim, round(w * width_mult / key_dim) * key_dim) for w in widths)
            heads = tuple(max(1, round(h * width_mult)) for h in heads)
        return levit((widths, heads, depths, key_dim), num_classes, in_channels, image_size, head_width, mean, std)

    make.__doc__ = f"LeViT-{name.split('_')[1].upper()} with 6 token exits (see dart_ee.models.levit)."
    register_model(name)(make)


for _name in VARIANTS:
    _register(_name)
