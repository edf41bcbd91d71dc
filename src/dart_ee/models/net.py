"""Multi-exit networks: an ordered list of stages, and one exit head after each stage.

The runtime can stop after any stage: ``stages[i]`` maps the features of stage i-1 to those of
stage i, and ``heads[i]`` turns them into logits. The last head is the backbone's own classifier.
Models take pixels in [0, 1] and normalise inside stage 1, so the difficulty estimator and the
network read the same tensor.

``create_model(name, ...)`` builds a registered model (timm-style); ``attach_exits`` turns a
user's own ``nn.Sequential`` into the same form.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from dart_ee.core.errors import ConfigError, InputError
from dart_ee.models.coderef import builder_ref, import_builder

_REGISTRY: dict[str, Callable[..., MultiExitNet]] = {}


def register_model(name: str) -> Callable:
    """Decorator: register a model builder under ``name`` (a second builder of the same name is refused)."""
    def deco(fn: Callable[..., MultiExitNet]) -> Callable[..., MultiExitNet]:
        if name in _REGISTRY:
            raise ConfigError(f"a model named {name!r} is registered already ({_REGISTRY[name].__qualname__}); "
                              "choose another name")
        _REGISTRY[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                 **kwargs) -> MultiExitNet:
    """Build a registered multi-exit model, e.g. ``create_model("alexnet", 10, 3, 32)``."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; choose one of {list_models()}")
    model = _REGISTRY[name](num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)
    model.arch = {"name": name, "num_classes": num_classes, "in_channels": in_channels,
                  "image_size": image_size, **kwargs}
    return model


class Normalize(nn.Module):
    """Per-channel (x - mean) / std, as a fixed part of the model."""

    mean: torch.Tensor  # buffers, declared for the type checker
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ExitHead(nn.Module):
    """A cheap classifier: pool to at most 4x4, a 1x1 conv with BatchNorm and ReLU, then a linear layer.

    The 1x1 conv gives the head one non-linearity of its own, which lifts early-exit accuracy far
    more than its cost: on the pooled map it is a few percent of the stage it follows.
    """

    def __init__(self, in_channels: int, spatial: int, num_classes: int, width: int = 128, pool: int = 4) -> None:
        super().__init__()
        p = min(pool, spatial)
        width = min(width, in_channels)
        self.body = nn.Sequential(
            nn.AdaptiveAvgPool2d(p),
            nn.Conv2d(in_channels, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Flatten(),
            nn.Linear(width * p * p, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class TokenHead(nn.Module):
    """A classifier on tokens (N, T, D), Eq 16: MLP(LayerNorm(mean token)), the MLP with one Hardswish layer."""

    def __init__(self, dim: int, num_classes: int, width: int = 128) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, width), nn.Hardswish(), nn.Linear(width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(x.mean(1)))


def make_head(feature_shape: Sequence[int], num_classes: int, width: int = 128) -> nn.Module:
    """Size a head from the shape (without batch) of the features it reads."""
    if len(feature_shape) == 2:
        return TokenHead(feature_shape[1], num_classes, width)
    if len(feature_shape) == 3:
        return ExitHead(feature_shape[0], min(feature_shape[1:]), num_classes, width)
    if len(feature_shape) == 1:
        return nn.Linear(feature_shape[0], num_classes)
    raise ConfigError(f"cannot attach an exit head to features of shape {tuple(feature_shape)}")


class MultiExitNet(nn.Module):
    """Stages S1..SN with exit heads E1..EN; ``forward`` returns every exit's logits."""

    def __init__(self, stages: Sequence[nn.Module], heads: Sequence[nn.Module],
                 input_shape: Sequence[int]) -> None:
        super().__init__()
        if len(stages) != len(heads) or not stages:
            raise ConfigError(f"need one head per stage, got {len(stages)} stages and {len(heads)} heads")
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.arch: dict = {}
        self.optimized = False  # set by optimize_for_inference

    @classmethod
    def from_stages(cls, stages: Sequence[nn.Module], input_shape: Sequence[int], head_width: int = 128,
                    builder: str | None = None, builder_kwargs: dict | None = None,
                    head: type[nn.Module] | str | None = None) -> MultiExitNet:
        """Stages listed by hand (for a network torch.fx cannot trace): the last must output the logits;
        a head sized from a probe pass goes after each of the others (``head(feature_shape, num_classes)``,
        an ``nn.Module`` class of yours, or ``make_head``'s pooled conv head by default).

        To save it in a run folder, name ``builder``: an ``nn.Module`` class (``"pkg.module:Class"``) whose
        instance, iterated, gives these stages (an ``nn.Sequential`` subclass, say); see ``dart_ee.models.custom``.
        """
        out_shape = _feature_shapes(stages, input_shape)[-1]
        if len(out_shape) != 1:
            raise ConfigError(f"the last stage's output has shape {out_shape} per sample, expected (num_classes,) logits")
        head_cls = import_builder(head, trusted=True, what="head") if isinstance(head, str) else head  # your own call
        net = _build(stages, nn.Identity(), out_shape[0], input_shape, head_width, head_cls)
        net.arch = _custom_arch(out_shape[0], input_shape, head_width, None, builder, builder_kwargs,
                                head if isinstance(head, str) else builder_ref(head_cls) if head_cls else None)
        return net

    @property
    def num_exits(self) -> int:
        return len(self.stages)

    def check_input(self, x: torch.Tensor) -> None:
        """Clear errors for the wrong shape, dtype or non-finite pixels."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise InputError(f"expected a float tensor of pixels in [0, 1], got "
                             f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise InputError(f"expected input of shape (N, {', '.join(map(str, self.input_shape))}), "
                             f"got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise InputError("empty batch: pass at least one image")
        if x.dtype != torch.float32:
            raise InputError(f"expected float32 pixels, got {x.dtype}; pass x.float()")
        lo, hi = torch.stack(torch.aminmax(x)).tolist()  # one read back to the host, not two
        if not (lo >= 0 and hi <= 1):  # NaN fails both comparisons
            raise InputError("input contains NaN or Inf pixels" if not (math.isfinite(lo) and math.isfinite(hi)) else
                             f"float pixels must lie in [0, 1] (got {lo:g} .. {hi:g}); pass uint8 pixels through "
                             "dart_ee.data.datasets.to_float or divide by 255")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for stage, head in zip(self.stages, self.heads):
            x = stage(x)
            outs.append(head(x))
        return outs

    def forward_static(self, x: torch.Tensor) -> torch.Tensor:
        """The plain network: every stage, then only the final classifier (no exit heads)."""
        for stage in self.stages:
            x = stage(x)
        return self.heads[-1](x)

    @torch.no_grad()
    def cost_breakdown(self) -> dict[str, list[int]]:
        """MACs of each stage and each head for one image, counted by ``FlopCounterMode`` (MACs = FLOPs / 2)."""
        was_training = self.training
        self.eval()
        p = next(self.parameters())
        x = torch.zeros(1, *self.input_shape, device=p.device)
        stage_macs: list[int] = []
        head_macs: list[int] = []
        for stage, head in zip(self.stages, self.heads):
            for module, out in ((stage, stage_macs), (head, head_macs)):
                with FlopCounterMode(display=False) as fc:
                    y = module(x)
                out.append(fc.get_total_flops() // 2)
                if module is stage:
                    x = y
        self.train(was_training)
        return {"stage_macs": stage_macs, "head_macs": head_macs}

    def exit_macs(self) -> list[int]:
        """Cumulative MACs to leave at each exit, counting every stage and every head passed."""
        c = self.cost_breakdown()
        out, total = [], 0
        for s, h in zip(c["stage_macs"], c["head_macs"]):
            total += s + h
            out.append(total)
        return out

    def static_macs(self) -> int:
        """MACs of the plain network (all stages plus the final classifier, no exit heads)."""
        c = self.cost_breakdown()
        return sum(c["stage_macs"]) + c["head_macs"][-1]

    @torch.no_grad()
    def describe(self) -> dict:
        """Per-exit costs and parameter counts, for ``dart-ee info`` and reports."""
        c = self.cost_breakdown()
        cum = self.exit_macs()
        was = self.training
        self.eval()
        with FlopCounterMode(display=False) as fc:  # one pass through every stage and head, as a check
            self(torch.zeros(1, *self.input_shape, device=next(self.parameters()).device))
        self.train(was)
        heads = sum(p.numel() for h in self.heads[:-1] for p in h.parameters())
        total = sum(p.numel() for p in self.parameters())
        exits = [{"exit": i + 1, "cumulative_macs": cum[i], "fraction_of_full": cum[i] / cum[-1],
                  "stage_macs": c["stage_macs"][i], "head_macs": c["head_macs"][i],
                  "head_to_stage": c["head_macs"][i] / max(1, c["stage_macs"][i])} for i in range(self.num_exits)]
        return {"arch": self.arch, "input_shape": list(self.input_shape), "num_exits": self.num_exits,
                "exits": exits, "full_forward_macs": fc.get_total_flops() // 2, "static_macs": self.static_macs(),
                "macs_counted_by": "torch.utils.flop_counter.FlopCounterMode (MACs = FLOPs / 2)",
                "params": {"total": total, "heads": heads, "backbone": total - heads}}

    def feature_shapes(self) -> list[tuple[int, ...]]:
        return _feature_shapes(list(self.stages), self.input_shape)


@torch.no_grad()
def _feature_shapes(stages: Sequence[nn.Module], input_shape: Sequence[int]) -> list[tuple[int, ...]]:
    p = next((q for s in stages for q in s.parameters()), None)
    x = torch.zeros(2, *input_shape, device=p.device if p is not None else "cpu")
    shapes = []
    for s in stages:
        was = s.training
        s.eval()
        x = s(x)
        s.train(was)
        shapes.append(tuple(x.shape[1:]))
    return shapes


def _build(stages: Sequence[nn.Module], final_head: nn.Module | None, num_classes: int,
           input_shape: Sequence[int], head_width: int, head: Callable[..., nn.Module] | None = None) -> MultiExitNet:
    """Size heads for every stage but the last; the last gets ``final_head`` (the backbone's classifier).
    ``head(feature_shape, num_classes)`` makes a custom head; by default ``make_head``."""
    shapes = _feature_shapes(stages, input_shape)
    make = head or (lambda shape, k: make_head(shape, k, head_width))
    heads = [make(s, num_classes) for s in shapes[:-1]]
    heads.append(final_head if final_head is not None else make(shapes[-1], num_classes))
    return MultiExitNet(stages, heads, input_shape)


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def _scale(widths: Sequence[int], mult: float) -> list[int]:
    """Scale channel widths by ``width_mult`` (slim variants for quick runs and small devices)."""
    if not (isinstance(mult, (int, float)) and math.isfinite(mult) and mult > 0):
        raise ConfigError(f"width_mult must be a finite number above 0, got {mult}")
    return [max(4, round(w * mult)) for w in widths]


def _norm(in_channels: int, mean: Sequence[float] | None, std: Sequence[float] | None) -> Normalize:
    return Normalize(mean or (0.5,) * in_channels, std or (0.25,) * in_channels)


# ----------------------------------------------------------------------------------------------
# AlexNet (CIFAR-style, with BatchNorm): 6 exits, after conv1..conv5 and the classifier.


@register_model("alexnet")
def alexnet(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, head_width: int = 128,
            mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
            dropout: float = 0.5, width_mult: float = 1.0) -> MultiExitNet:
    c1, c2, c3, c4, c5, fc = _scale((64, 192, 384, 256, 256, 1024), width_mult)
    stages: list[nn.Module] = [
        nn.Sequential(_norm(in_channels, mean, std), conv_bn(in_channels, c1), nn.MaxPool2d(2)),
        nn.Sequential(conv_bn(c1, c2), nn.MaxPool2d(2)),
        conv_bn(c2, c3),
        conv_bn(c3, c4),
        nn.Sequential(conv_bn(c4, c5), nn.MaxPool2d(2)),
    ]
    c, h, w = _feature_shapes(stages, (in_channels, image_size, image_size))[-1]
    stages.append(nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c * h * w, fc), nn.ReLU(inplace=True),
                                nn.Dropout(dropout), nn.Linear(fc, fc), nn.ReLU(inplace=True)))
    return _build(stages, nn.Linear(fc, num_classes), num_classes, (in_channels, image_size, image_size),
                  head_width)


# ----------------------------------------------------------------------------------------------
# ResNet-18 (CIFAR stem: 3x3 conv, no max-pool): 4 exits, after each residual stage.


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, 3, stride), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(cout))
        self.short = (nn.Identity() if stride == 1 and cin == cout else
                      nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.short(x))


@register_model("resnet18")
def resnet18(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, head_width: int = 128,
             mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
             width_mult: float = 1.0) -> MultiExitNet:
    widths = _scale((64, 128, 256, 512), width_mult)
    stages, cin = [], widths[0]
    for i, w in enumerate(widths):
        blocks: list[nn.Module] = [BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)]
        if i == 0:
            blocks = [_norm(in_channels, mean, std), conv_bn(in_channels, cin), *blocks]
        stages.append(nn.Sequential(*blocks))
        cin = w
    final = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))
    return _build(stages, final, num_classes, (in_channels, image_size, image_size), head_width)


# ----------------------------------------------------------------------------------------------
# VGG-16 with BatchNorm: 5 exits, one per block (the last is the classifier).


@register_model("vgg16")
def vgg16(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, head_width: int = 128,
          mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
          width_mult: float = 1.0) -> MultiExitNet:
    c1, c2, c3, c4 = _scale((64, 128, 256, 512), width_mult)
    blocks = ((c1, c1), (c2, c2), (c3, c3, c3), (c4, c4, c4), (c4, c4, c4))
    stages, cin = [], in_channels
    for i, widths in enumerate(blocks):
        layers: list[nn.Module] = [_norm(in_channels, mean, std)] if i == 0 else []
        for w in widths:
            layers.append(conv_bn(cin, w))
            cin = w
        # ceil_mode keeps a 1x1 map after five pools of a 28x28 input (28-14-7-4-2-1)
        layers.append(nn.MaxPool2d(2, ceil_mode=True))
        stages.append(nn.Sequential(*layers))
    final = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))
    return _build(stages, final, num_classes, (in_channels, image_size, image_size), head_width)


# ----------------------------------------------------------------------------------------------
# Inference: fold BatchNorm, pool before ReLU, channels_last


class ChannelsLast(nn.Module):
    """Put the input in channels_last layout, which oneDNN's CPU convolutions run fastest in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last)


def _flatten_sequential(mod: nn.Sequential) -> list[nn.Module]:
    out: list[nn.Module] = []
    for m in mod:
        out.extend(_flatten_sequential(m) if isinstance(m, nn.Sequential) else [m])
    return out


def _optimize_sequential(mod: nn.Sequential) -> nn.Sequential:
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    layers = _flatten_sequential(mod)
    out: list[nn.Module] = []
    for m in layers:
        if isinstance(m, nn.BatchNorm2d) and out and isinstance(out[-1], nn.Conv2d):
            out[-1] = fuse_conv_bn_eval(out[-1], m)  # conv(x) * scale + shift, folded into the weights
        elif isinstance(m, nn.MaxPool2d) and out and isinstance(out[-1], nn.ReLU):
            out.insert(len(out) - 1, m)  # max-pool then ReLU: equal (ReLU is monotone), on 4x fewer values
        else:
            out.append(m)
    for m in out:
        if isinstance(m, nn.ReLU):
            m.inplace = True
    return nn.Sequential(*out)


def _optimize_children(mod: nn.Module) -> None:
    for name, child in mod.named_children():
        if isinstance(child, nn.Sequential):
            child = _optimize_sequential(child)
            setattr(mod, name, child)
        _optimize_children(child)


@torch.no_grad()
def optimize_for_inference(model: MultiExitNet, channels_last: bool = True) -> MultiExitNet:
    """An eval-mode copy that computes the same function faster on CPU.

    BatchNorm is folded into the preceding convolution, ReLU moves after max-pooling, and activations
    are kept in channels_last layout. The static baseline, the traces and the early-exit runtime all
    use the same optimised model, so comparisons stay fair and decisions stay identical.
    """
    import copy

    opt = copy.deepcopy(model).eval()
    _optimize_children(opt)
    if channels_last:
        opt.stages[0] = nn.Sequential(ChannelsLast(), *_flatten_sequential(cast(nn.Sequential, opt.stages[0])))
        opt = opt.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # the stubs lack it
    opt.arch = dict(model.arch)
    opt.optimized = True
    return opt


# ----------------------------------------------------------------------------------------------
# Bring your own model


class _SplitTracer(fx.Tracer):
    """torch.fx tracing that keeps the modules named as split points whole (one node each), and remembers
    which module it was inside when tracing fails, to name it."""

    def __init__(self, keep: set[str]) -> None:
        super().__init__()
        self.keep, self.inside = keep, "(top level)"

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.keep or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        outer, self.inside = self.inside, self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self.inside = outer


class _Tensor(nn.Module):
    """A parameter or buffer the network's own forward reads (``(x - self.mean) / self.std``), held by a module
    so that the stage that reads it owns it (split_module would pass bare tensors in as extra inputs)."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        if isinstance(value, nn.Parameter):
            self.value = value
        else:
            self.register_buffer("value", value)

    def forward(self) -> torch.Tensor:
        return self.value


def _tensors_into_modules(gm: fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if node.op != "get_attr":
            continue
        value: object = gm
        for part in node.target.split("."):
            value = getattr(value, part)
        if not isinstance(value, torch.Tensor):
            continue
        name = "tensor_" + node.target.replace(".", "_")
        if not hasattr(gm, name):
            gm.add_submodule(name, _Tensor(value))
        with gm.graph.inserting_before(node):
            node.replace_all_uses_with(gm.graph.call_module(name))
        gm.graph.erase_node(node)
    gm.recompile()


def split_stages(model: nn.Module, after: Sequence[str]) -> list[nn.Module]:
    """``model`` cut into stages that end at the modules named in ``after`` (torch.fx), for real early exit.

    Each stage must hand exactly one tensor to the next: a cut inside a residual block (where the
    skip branch also crosses) is refused, naming the cut.
    """
    from torch.fx.passes.split_module import split_module

    modules = dict(model.named_modules())
    for name in after:
        if name not in modules or name == "":
            raise ConfigError(f"no module named {name!r} in {type(model).__name__}; its modules are "
                              f"{[n for n, _ in model.named_children()]} and their children (e.g. 'layer1', 'layer1.0')")
    tracer = _SplitTracer(set(after))
    try:
        graph = tracer.trace(model)
    except Exception as e:  # fx raises many types for code it cannot follow
        raise ConfigError(f"torch.fx cannot trace {type(model).__name__} (inside module {tracer.inside!r}: "
                          f"{type(e).__name__}: {e}); list the stages by hand instead: "
                          "MultiExitNet.from_stages([stage1, stage2, ...], input_shape=...)") from e
    order = [n.target for n in graph.nodes if n.op == "call_module" and n.target in set(after)]
    if order != list(after):
        raise ConfigError(f"split points must each run once, in execution order: the network runs {order}, "
                          f"got {list(after)}")
    gm = fx.GraphModule(model, graph)
    _tensors_into_modules(gm)
    part, parts = 0, {}
    for node in gm.graph.nodes:
        parts[node] = part
        if node.op == "call_module" and node.target in after:
            part += 1
    split = split_module(gm, gm, lambda node: parts[node])
    calls = [n for n in split.graph.nodes if n.op == "call_module"]
    for i, call in enumerate(calls[1:]):
        if len(call.args) != 1 or call.kwargs:
            raise ConfigError(f"after {after[i]!r} more than one value flows on to the rest of the network (a "
                              "residual branch crosses the cut): choose a module whose output is all that later "
                              "layers read, e.g. a whole block ('layer1', not 'layer1.0.conv1')")
    return [getattr(split, c.target) for c in calls]


def _custom_arch(num_classes: int, input_shape: Sequence[int], head_width: int, after: list[str] | None,
                 builder: str | None, builder_kwargs: dict | None, head: str | None) -> dict:
    """What ``dart_ee.models.custom.rebuild`` needs to make the model again (weights come from the state dict)."""
    return {"name": "custom", "num_classes": num_classes, "in_channels": int(input_shape[0]),
            "image_size": int(input_shape[-1]), "head_width": head_width, "after": after, "builder": builder,
            "builder_kwargs": dict(builder_kwargs or {}), "head": head}


def attach_exits(model: nn.Module, after: Sequence[str | int], example_input: torch.Tensor | None = None,
                 input_shape: Sequence[int] | None = None, num_classes: int | None = None,
                 head_width: int = 128, builder: type[nn.Module] | str | None = None,
                 builder_kwargs: dict | None = None, head: type[nn.Module] | str | None = None) -> MultiExitNet:
    """Put exits on any network: cut it into stages after the modules named in ``after`` (torch.fx, so
    residual networks and token models work), with a head sized from a probe pass after each cut.

    The network's own output is the final exit. ``after`` may also give child indices of an
    ``nn.Sequential``. The input shape comes from ``example_input`` (or ``input_shape``, (C, H, W));
    the number of classes from the network's output. In eval mode the staged network computes exactly
    what the original does.

    ``builder`` (default: the network's own class) and ``builder_kwargs`` say how commands rebuild the
    network from a run folder (``fit_exits(..., run_dir=...)``, see ``dart_ee.models.custom``). ``head``: your own
    exit head class, called as ``head(feature_shape, num_classes)``.
    """
    if example_input is not None:
        input_shape = tuple(example_input.shape[1:])
    if input_shape is None:
        raise ConfigError("attach_exits needs example_input (a batch) or input_shape (C, H, W)")
    names = [n for n, _ in model.named_children()]
    cuts = []
    for a in after:
        if isinstance(a, int) and not 0 <= a < len(names) - 1:
            raise ConfigError(f"split point {a} is not a child of the network before its last one; children are "
                              f"{names}")
        cuts.append(names[a] if isinstance(a, int) else a)
    if names and cuts and cuts[-1] == names[-1]:
        raise ConfigError(f"split point {cuts[-1]!r} is the network's last module: its output is already the final "
                          "exit; cut before it")
    was = model.training
    stages = split_stages(model.eval(), cuts)
    model.train(was)
    out_shape = _feature_shapes(stages, input_shape)[-1]
    if num_classes is not None and out_shape != (num_classes,):
        raise ConfigError(f"the network's output has shape {out_shape} per sample, expected ({num_classes},) logits")
    net = MultiExitNet.from_stages(stages, input_shape, head_width, head=head)
    net.arch.update(after=cuts, builder=builder_ref(builder or type(model)), builder_kwargs=dict(builder_kwargs or {}))
    return net
