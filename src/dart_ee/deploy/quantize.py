"""int8 exports: onnxruntime static quantisation of the backbone, and policies re-fitted on an int8 trace.

Only the stage graphs and the static network are quantised (QDQ, int8 weights per channel, uint8
activations, ranges calibrated on images of the calibration split). They hold nearly all the MACs;
the exit heads, the estimators and the decisions stay fp32, so a policy's arithmetic is unchanged.
Quantisation moves every exit's confidences, though, so thresholds fitted in fp32 no longer mean what
they did: each policy is fitted again, with the same budget and certification settings, on a trace of
the calibration split made by the int8 graphs themselves (``int8_traces``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from dart_ee.calibration.calibrate import calibrate_or_static
from dart_ee.calibration.record import CalibrationRecord, recorded
from dart_ee.core import artifacts
from dart_ee.core.errors import ConfigError
from dart_ee.deploy.onnx_runner import OnnxRunner, session_options, shared_pool_active
from dart_ee.policies import POLICIES, ExitPolicy
from dart_ee.runs.run import Run
from dart_ee.trace import Trace


class _Reader:
    """onnxruntime's calibration data reader: batches of one graph input."""

    def __init__(self, name: str, data: np.ndarray, batch_size: int = 32) -> None:
        self.batches = iter([{name: data[s: s + batch_size]} for s in range(0, len(data), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def quantize_graphs(out: Path, num_exits: int, images: np.ndarray) -> None:
    """Quantise ``stage_*.onnx`` and ``static.onnx`` in ``out`` in place; ``static_fp32.onnx`` keeps the
    fp32 network, the baseline int8 is measured against."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    if shared_pool_active():
        raise ConfigError("int8 quantisation makes onnxruntime sessions of its own, which onnxruntime refuses once a "
                          "runner put this process on a shared thread pool (shared_pool=True): quantise in a "
                          "process without such runners (`dart-ee export --dtype int8`)")

    x = images.astype(np.float32) / np.float32(255)
    inputs = {"static.onnx": ("x", x)}
    h = x
    for i in range(num_exits):  # each stage calibrates on the fp32 activations that reach it
        name = "x" if i == 0 else "h_in"
        inputs[f"stage_{i}.onnx"] = (name, h)
        h = ort.InferenceSession(str(out / f"stage_{i}.onnx"), session_options()).run(None, {name: h})[0]
    (out / "static.onnx").replace(out / "static_fp32.onnx")
    for rel, (name, data) in inputs.items():
        src = out / ("static_fp32.onnx" if rel == "static.onnx" else rel)

        def write(tmp: Path, src: Path = src, name: str = name, data: np.ndarray = data) -> None:
            quantize_static(str(src), str(tmp), _Reader(name, data), quant_format=QuantFormat.QDQ, per_channel=True,
                            weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
        artifacts.atomic_write(out / rel, write)


def int8_traces(out: Path, run: Run, data_dir: str | Path | None) -> dict[str, Trace]:
    """The run's calibration and test traces with every exit's softmax from the int8 graphs in ``out``.

    Test alphas come from the exported estimators on the int8 exit 1 (what the runner reads); the
    calibration split keeps its out-of-fold learned alpha, which is what policies are fitted on.
    """
    runner = OnnxRunner(out, policy=None)
    traces = {}
    for split in ("cal", "test"):
        images = run.images(split, data_dir).x
        fp32 = run.trace(split)
        probs: list[np.ndarray] = []
        alphas: dict[str, list[np.ndarray]] = {"paper": [], "learned": []}
        for s in range(0, len(images), 500):
            p, a = runner.exit_outputs(images[s: s + 500])
            probs.append(np.stack(p, 1))
            for k in alphas:
                alphas[k].append(a[k])
        extra = dict(fp32.extra)
        if split == "test":
            extra.update({f"alpha_{k}": np.concatenate(v) for k, v in alphas.items()})
        source = fp32.meta.get("difficulty", "paper")
        traces[split] = dataclasses.replace(
            fp32, probs=np.concatenate(probs), alpha=extra.get(f"alpha_{source}", fp32.alpha), extra=extra,
            meta={**fp32.meta, "engine": "onnxruntime int8"})
    return traces


def refit(policy_json: dict[str, Any], cal: Trace, name: str, seed: int) -> tuple[ExitPolicy, CalibrationRecord] | None:
    """The policy fitted again on ``cal`` with the budget and certification settings it was fitted with
    (None: it records none, e.g. a policy built by hand, and is kept as it is). ``name`` is the file's
    name: a policy that could not be certified in fp32 was saved as the static network, and int8 tries
    the policy it stands for again."""
    rec = recorded(policy_json, f"the {name} policy")
    max_drop = rec["target"].get("max_drop") if rec else None
    if rec is None or max_drop is None:
        return None
    target, g = rec["target"], rec.get("guarantee", {})
    name = name if name in POLICIES else policy_json["policy"]
    source = (policy_json.get("fitted") or {}).get("alpha_source_")
    cert = ({"risk": target.get("risk", "drop"), "seed": g.get("split_seed", seed), "fit_share": g["fit_share"]}
            if target.get("confidence") and "fit_share" in g else {})
    return calibrate_or_static(name, cal.with_alpha(f"alpha_{source}") if source else cal, max_drop,
                               target.get("confidence"), tune_beta_diff=name == "dart", **cert)
