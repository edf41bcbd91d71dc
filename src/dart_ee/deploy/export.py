"""Per-stage ONNX export of a finished run, for serving with onnxruntime (``dart_ee.deploy.onnx_runner``).

One exported graph cannot exit early: a static all-exit graph saves nothing, and per-sample,
data-dependent batch sizes are not expressible in it. So each segment of the network is its own
graph with a dynamic batch dimension, and the routing stays on the host, as in ``EarlyExitRunner``:

    stage_{i}.onnx        x or h_{i-1} -> h_i           (stage 1 includes the input normalisation)
    exit_{i}.onnx         h_i -> logits_i, probs_i      (the head, then its softmax in float32)
    alpha_paper.onnx      x -> alpha                    (the paper's difficulty score)
    alpha_learned.onnx    x, h_1, logits_1 -> alpha     (the learned estimator)
    static.onnx           x -> probs                    (the plain network, no heads: the baseline)
    policies/NAME.json    a fitted policy, with policies/NAME/exit_{i}.onnx for each early exit: the head,
                          its softmax and the policy's decision in one graph
                          h_i [, x at exit 1 | alpha] [, state] -> logits, probs, leave [, alpha] [, state]
    manifest.json         input shape, normalisation, exit MACs, fingerprints, a checksum of every file

The decisions are the policies' own ``decide`` code, traced with their fitted tables as
constants, so onnxruntime routes exactly as the torch runtime does. ``dtype="int8"`` quantises the
stage, exit and static graphs with onnxruntime's static quantisation, calibrated on the run's
calibration split; quantisation moves confidences, so re-fit the policies on an int8 trace
(``onnx_trace``) rather than trusting thresholds fitted in fp32.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import io
import json
import logging
import shutil
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dart_ee import policies
from dart_ee.calibration.record import is_certified
from dart_ee.core import artifacts
from dart_ee.core.errors import ArtifactError, ConfigError
from dart_ee.core.lock import LOCK_FILE, run_lock
from dart_ee.core.runfiles import CONFIG, ESTIMATORS, METRICS, MODEL, POLICY_DIR
from dart_ee.deploy.onnx_runner import FORMAT, MANIFEST, OPSETS
from dart_ee.deploy.quantize import int8_traces, quantize_graphs, refit
from dart_ee.difficulty import estimators as difficulty
from dart_ee.difficulty.estimators import LearnedDifficulty
from dart_ee.models import levit
from dart_ee.models import net as models
from dart_ee.models.net import MultiExitNet, Normalize
from dart_ee.policies import ExitPolicy, StaticPolicy, load_policy
from dart_ee.runs.run import Run
from dart_ee.runtime.eager import alpha_source

DTYPES = ("fp32", "int8")


class _SlicedAdaptiveAvgPool(nn.Module):
    """``AdaptiveAvgPool2d`` as slices and means, for export: the TorchScript exporter cannot express bins
    that do not divide the input (a 7x7 map pooled to 4x4), and torch.export takes seconds a graph."""

    def __init__(self, output_size: int | tuple[int, int]) -> None:
        super().__init__()
        self.size: tuple[int, int] = (output_size, output_size) if isinstance(output_size, int) else output_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # plain ints: traced sizes would turn the floor divisions below into ONNX's truncating ones
        (h, w), (oh, ow) = (int(x.shape[-2]), int(x.shape[-1])), self.size
        if h % oh == 0 and w % ow == 0:
            return F.adaptive_avg_pool2d(x, (oh, ow))
        # bin i spans [floor(i * h / oh), ceil((i + 1) * h / oh)), as in torch's kernel
        rows = [x[..., i * h // oh: -(-(i + 1) * h // oh), :] for i in range(oh)]
        return torch.stack([torch.stack([r[..., j * w // ow: -(-(j + 1) * w // ow)].mean((-2, -1)) for j in range(ow)], -1)
                            for r in rows], -2)


def _exportable(model: MultiExitNet) -> MultiExitNet:
    """A copy of ``model`` whose adaptive poolings the fast exporter can express."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.AdaptiveAvgPool2d):
                setattr(parent, name, _SlicedAdaptiveAvgPool(child.output_size))  # type: ignore[arg-type]
    return model


class _Exit(nn.Module):
    """An exit head and its softmax, in float32 as the runtime computes it."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.head(h).float()
        return logits, F.softmax(logits, 1)


class _Static(nn.Module):
    def __init__(self, model: MultiExitNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.model.forward_static(x).float(), 1)


class _Alpha(nn.Module):
    """The paper's score (``x``) or the learned estimator (``x``, stage 1's output, exit 1's logits)."""

    def __init__(self, estimator: LearnedDifficulty, source: str) -> None:
        super().__init__()
        self.estimator, self.source = estimator, source

    def forward(self, x: torch.Tensor, h1: torch.Tensor | None = None, logits1: torch.Tensor | None = None) -> torch.Tensor:
        # check=False: the input checks read values back to the host, which a graph cannot hold; the
        # runner checks its input once, up front
        return self.estimator.score(self.source, x, h1, logits1, check=False)


class _RoutedExit(nn.Module):
    """Exit ``i`` under a policy: the head, its softmax and ``policy.decide`` in one graph (one host call per
    stage instead of three: at batch 1 each call's fixed cost is a tenth of a stage's). At exit 1 a
    policy that reads alpha computes it here too, from the image ``x`` (and, for the learned estimator,
    stage 1's output and exit 1's logits). The fitted tables become constants."""

    def __init__(self, head: nn.Module, policy: ExitPolicy, i: int, source: str | None, estimator: LearnedDifficulty,
                 state_keys: Sequence[str]) -> None:
        super().__init__()
        self.exit, self.policy, self.i, self.source, self.keys = _Exit(head), policy, i, source, list(state_keys)
        self.alpha = _Alpha(estimator, source) if source and i == 0 else None

    def forward(self, h: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, probs = self.exit(h)
        extra, rest = (rest[0], rest[1:]) if self.source else (None, rest)  # x at exit 1, alpha after it
        alpha = self.alpha(extra, h, logits) if self.alpha is not None else extra
        state = dict(zip(self.keys, rest))
        leave = self.policy.decide(self.i, probs, alpha, state)
        return (logits, probs, leave, *([alpha] if self.alpha is not None else []), *(state[k] for k in self.keys))


def _onnx(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], opset: int) -> None:
    """Export with a dynamic batch dimension on every input and output, atomically.

    The TorchScript exporter (``dynamo=False``) goes first: these graphs are plain convolutions and
    table lookups, and it exports each in a fraction of a second, against seconds with torch.export.
    What it cannot express (an adaptive pooling whose output size does not divide its input) goes
    through torch.export (``dynamo=True``), which decomposes it.
    """
    def write(tmp: Path) -> None:
        export = functools.partial(torch.onnx.export, module.eval(), args, str(tmp), input_names=inputs,
                                   output_names=outputs)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # both exporters are chatty
            warnings.simplefilter("ignore")
            try:
                export(opset_version=opset, dynamo=False, dynamic_axes={n: {0: "batch"} for n in (*inputs, *outputs)})
            except torch.onnx.errors.OnnxExporterError:
                log = logging.getLogger("torch.onnx")
                level = log.level
                log.setLevel(logging.ERROR)
                try:
                    export(opset_version=max(opset, 18), dynamo=True, verbose=False,
                           dynamic_shapes=_batch_dims(module, len(args)))
                finally:
                    log.setLevel(level)
    artifacts.atomic_write(path, write)


def _batch_dims(module: nn.Module, n_args: int) -> tuple:
    """torch.export's dynamic shapes for ``n_args`` positional arguments: dimension 0 of each is the batch.
    A ``*rest`` parameter takes the remaining arguments as one tuple, and its entry must be a tuple too."""
    batch = torch.export.Dim("batch")
    params = list(inspect.signature(module.forward).parameters.values())
    fixed = [p for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
    if any(p.kind == p.VAR_POSITIONAL for p in params) and n_args > len(fixed):
        return (*({0: batch} for _ in fixed), tuple({0: batch} for _ in range(n_args - len(fixed))))
    return tuple({0: batch} for _ in range(n_args))


def _normalisation(model: MultiExitNet) -> dict[str, list[float]] | None:
    norm = next((m for m in model.modules() if isinstance(m, Normalize)), None)
    return None if norm is None else {"mean": norm.mean.flatten().tolist(), "std": norm.std.flatten().tolist()}


def code_fingerprint() -> str:
    """A checksum of the code that an export traces into its graphs (the models, the estimators, the
    policies' decisions and this exporter): an export that other code made is not reused."""
    return artifacts.fingerprint([artifacts.file_fingerprint(f) for f in (models.__file__, levit.__file__,
                                                                          difficulty.__file__, policies.__file__, __file__)])


MARK = ".dart-ee-export"  # written first into an export folder: the run it exports (a killed export resumes)


def export_names(paths: Sequence[str | Path]) -> list[str]:
    """The name each policy file is exported under: its file name's stem, numbered when two files share one
    (``a/dart.json``, ``b/dart.json``: ``dart``, ``dart_2``), so that no policy replaces another."""
    names: list[str] = []
    for p in paths:
        stem, k = Path(p).stem, 2
        name = stem
        while name in names:
            name, k = f"{stem}_{k}", k + 1
        names.append(name)
    return names


def check_out(out: Path, run_path: Path) -> None:
    """Refuse an ``--out`` that export would damage: the run folder, another run folder, another run's export,
    or a folder holding anything else. An earlier (or killed) export of the same run is replaced."""
    if out.resolve() == run_path.resolve():
        raise ConfigError("--out must not be the run folder itself: name a folder of its own, e.g. RUN/export")
    if not out.is_dir() or not any(p.name != LOCK_FILE for p in out.iterdir()):
        return
    if (out / MODEL).exists() or (out / CONFIG).exists():
        raise ConfigError(f"--out {out} is a run folder: export writes a folder of its own, e.g. {out}/export")
    made_for = None
    if (out / MARK).is_file():
        made_for = (out / MARK).read_text().strip()
    elif (out / MANIFEST).is_file():  # an export made before the mark existed
        run = artifacts.read_json(out / MANIFEST, "export manifest").get("run")
        made_for = str(Path(run).resolve()) if isinstance(run, str) else "an unknown run"
    if made_for is None:
        raise ConfigError(f"--out {out} is not empty and holds no export: choose an empty or new folder (export never "
                          "writes into a folder it did not make)")
    if made_for != str(run_path.resolve()):
        raise ConfigError(f"--out {out} holds the export of another run ({made_for}): choose another folder, or remove "
                          "it first")


def _policy_paths(run: Run, policies: Sequence[str | Path] | None) -> list[Path]:
    if policies:
        return [Path(p) for p in policies]
    paths = sorted((run.path / POLICY_DIR).glob("*.json"))
    if not paths:
        raise ArtifactError(f"{run.path / POLICY_DIR} holds no fitted policy: the run is unfinished; finish it with "
                            "`dart-ee run` (or fit one with `dart-ee calibrate`) before exporting")
    return paths


class _Writer:
    """Writes one export's graphs into ``out`` and lists each file written (the manifest checksums them)."""

    def __init__(self, out: Path, opset: int, model: MultiExitNet, est: LearnedDifficulty) -> None:
        self.out, self.opset, self.model, self.est = out, opset, model, est
        self.files: list[str] = []
        self.x = torch.rand(2, *model.input_shape)
        self.hs: list[torch.Tensor] = []  # each stage's output on ``x``: the example inputs of the exit graphs
        self.exit_macs, self.static_macs = model.exit_macs(), float(model.static_macs())
        self.est_macs = est.macs(model)

    def add(self, rel: str, module: nn.Module, args: tuple, inputs: list[str], outputs: list[str]) -> None:
        _onnx(module, args, self.out / rel, inputs, outputs, self.opset)
        self.files.append(rel)

    def network(self) -> int:
        """The static network, each stage and exit head, both difficulty estimators; returns the class count."""
        model, est, x = self.model, self.est, self.x
        self.add("static.onnx", _Static(model), (x,), ["x"], ["probs"])
        h = x
        for i in range(model.num_exits):
            self.add(f"stage_{i}.onnx", model.stages[i], (h,), ["x" if i == 0 else "h_in"], ["h"])
            h = model.stages[i](h)
            self.hs.append(h)
            self.add(f"exit_{i}.onnx", _Exit(model.heads[i]), (h,), ["h"], ["logits", "probs"])
        logits1, probs = _Exit(model.heads[0])(self.hs[0])
        self.add("alpha_paper.onnx", _Alpha(est, "paper"), (x,), ["x"], ["alpha"])
        self.add("alpha_learned.onnx", _Alpha(est, "learned"), (x, self.hs[0], logits1), ["x", "h1", "logits1"],
                 ["alpha"])
        return int(probs.shape[1])

    def policy(self, name: str, pol: ExitPolicy, text: str | None, graph: str = "static.onnx") -> dict[str, Any]:
        """The policy's JSON and, unless it never leaves early, its routed exits (head, softmax, decision)."""
        model, est = self.model, self.est
        source = alpha_source(model, pol, est)
        state = pol.init_state(2)
        static = isinstance(pol, StaticPolicy) or pol.never_leaves_early()
        info: dict[str, Any] = {
            "file": f"{POLICY_DIR}/{name}.json" if text else None, "policy": pol.name, "static": static,
            "graph": graph if static else None, "alpha_source": source,
            "state": {k: {"dtype": str(v.dtype).removeprefix("torch."), "fill": v[0].item()} for k, v in state.items()},
            "leave_macs": (StaticPolicy() if static else pol).leave_costs(self.exit_macs, self.static_macs,
                                      self.est_macs).tolist(),
            "exits": []}
        if text:
            artifacts.write_text(self.out / info["file"], text)
            self.files.append(info["file"])
        for i in range(0 if static else model.num_exits - 1):
            rel = f"{POLICY_DIR}/{name}/exit_{i}.onnx"
            extra = [] if not source else [("x", self.x)] if i == 0 else [("alpha", torch.rand(2))]
            args = (self.hs[i], *(v for _, v in extra), *state.values())
            self.add(rel, _RoutedExit(model.heads[i], pol, i, source, est, list(state)), args,
                     ["h", *(k for k, _ in extra), *state],
                     ["logits", "probs", "leave", *(["alpha"] if source and i == 0 else []), *(f"{k}_out" for k in state)])
            info["exits"].append(rel)
        return info

    def forget(self, name: str) -> None:
        """Remove a policy's files (before it is written again, re-fitted)."""
        shutil.rmtree(self.out / POLICY_DIR / name, ignore_errors=True)
        self.files[:] = [f for f in self.files if f != f"{POLICY_DIR}/{name}.json" and
                         not f.startswith(f"{POLICY_DIR}/{name}/")]

    def checksums(self) -> dict[str, str]:
        return {rel: artifacts.file_fingerprint(self.out / rel) for rel in self.files}


def export_run(run_dir: str | Path, out: str | Path, opset: int = 17, dtype: str = "fp32",
               policies: Sequence[str | Path] | None = None, data_dir: str | Path | None = None,
               calibration_images: int = 512) -> dict:
    """Export a finished run (model, estimators, fitted policies) to ``out``; return the manifest.

    ``policies``: policy JSON files (default: every ``RUN/policies/*.json``), exported under their file
    names' stems. ``dtype="int8"`` needs the run's data (``data_dir``) for the calibration images.
    """
    run, out = Run(run_dir), Path(out)
    _check_request(run, dtype, opset)
    paths = _policy_paths(run, policies)
    check_out(out, run.path)
    with run_lock(out):  # the folder written; the run is only read, so a read-only run exports too
        check_out(out, run.path)  # again, now that no other export can be writing there
        w = _Writer(out, opset, _exportable(run.model()), run.estimators())
        (out / MANIFEST).unlink(missing_ok=True)  # no manifest until every file is written: a half export never loads
        artifacts.write_text(out / MARK, f"{run.path.resolve()}\n")
        shutil.rmtree(out / POLICY_DIR, ignore_errors=True)
        num_classes = w.network()
        chosen: dict[str, tuple[ExitPolicy, str | None]] = {
            name: (load_policy(p), p.read_text()) for name, p in zip(export_names(paths), paths)}
        if "static" not in chosen:  # the baseline every benchmark compares with
            chosen["static"] = (StaticPolicy(), None)
        if dtype == "int8":
            cal = run.images("cal", data_dir).x
            calibration_images = min(calibration_images, len(cal))  # the manifest records what was used
            quantize_graphs(out, w.model.num_exits,
                            cal[np.random.default_rng(0).permutation(len(cal))[:calibration_images]])
            w.files.append("static_fp32.onnx")
            chosen["static_fp32"] = (StaticPolicy(), None)
        pol_info = {name: w.policy(name, pol, text, "static_fp32.onnx" if name == "static_fp32" else "static.onnx")
                    for name, (pol, text) in chosen.items()}
        manifest = _manifest(run, w, dtype, num_classes, pol_info)
        artifacts.write_json(out / MANIFEST, manifest)
        if dtype == "int8":  # quantisation moves the confidences: fit every policy again on an int8 trace
            manifest["int8"] = _refit_int8(run, w, chosen, pol_info, data_dir, calibration_images)
            manifest["files"] = w.checksums()
            artifacts.write_json(out / MANIFEST, manifest)
    return manifest


def _check_request(run: Run, dtype: str, opset: int) -> None:
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not offered: choose one of {', '.join(DTYPES)}")
    if opset not in OPSETS:
        raise ConfigError(f"--opset {opset} is not offered: choose {OPSETS.start} to {OPSETS.stop - 1}")
    for name in (MODEL, ESTIMATORS, METRICS):
        if not (run.path / name).is_file():
            raise ArtifactError(f"{run.path / name} is missing: the run is unfinished; finish it with `dart-ee run` "
                                "before exporting")


def _manifest(run: Run, w: _Writer, dtype: str, num_classes: int, pol_info: dict) -> dict:
    """What the export holds and where it came from; ``files`` checksums every file listed (nothing else loads)."""
    metrics = artifacts.read_json(run.path / METRICS, "metrics file")
    return {
        "format": FORMAT, "made_by": "dart-ee export", "run": str(run.path), "dtype": dtype, "opset": w.opset,
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "input": {"shape": list(w.model.input_shape), "dtype": "float32", "range": [0.0, 1.0],
                  "normalisation": _normalisation(w.model), "note": "uint8 pixels are divided by 255; the "
                  "normalisation is inside stage_0.onnx and static.onnx"},
        "num_exits": w.model.num_exits, "num_classes": num_classes,
        "exit_macs": [float(m) for m in w.exit_macs], "static_macs": w.static_macs,
        "estimator_macs": {k: float(v) for k, v in w.est_macs.items()},
        "code_fingerprint": code_fingerprint(),
        "model_fingerprint": artifacts.file_fingerprint(run.path / MODEL),
        "estimators_fingerprint": artifacts.file_fingerprint(run.path / ESTIMATORS),
        "train_fingerprint": metrics.get("train_fingerprint"),
        "exit_test_accuracy_torch": metrics.get("exit_test_accuracy"),
        "policies": pol_info,
        "files": w.checksums(),
    }


def _refit_int8(run: Run, w: _Writer, chosen: dict[str, tuple[ExitPolicy, str | None]], pol_info: dict,
                data_dir: str | Path | None, calibration_images: int) -> dict:
    """Each policy fitted again, with its own budget and certification settings, on a trace of the calibration
    split made by the int8 graphs, and written over its fp32 files; the manifest's int8 section."""
    traces = int8_traces(w.out, run, data_dir)
    refits = {}
    for name, (pol, text) in chosen.items():
        fitted = refit(json.loads(text), traces["cal"], name, run.config().seed) if text else None
        if fitted is not None:
            new_pol, rec = fitted
            refits[name] = {"fp32": pol.name, "int8": new_pol.name, "calibration": rec["calibration"],
                            "certified": is_certified(rec)}
            w.forget(name)
            pol_info[name] = w.policy(name, new_pol, json.dumps(new_pol.to_dict() | {"calibration": rec}, indent=2) + "\n")
    return {"calibration_images": calibration_images, "quantised": "stages and the static network (QDQ, int8 "
            "weights per channel, uint8 activations); heads, estimators and decisions in fp32",
            "exit_test_accuracy_fp32": run.trace("test").exit_accuracy(),
            "exit_test_accuracy_int8": traces["test"].exit_accuracy(),
            "exit_cal_accuracy_int8": traces["cal"].exit_accuracy(), "refit": refits}


def is_current(export_dir: str | Path, run_dir: str | Path, policies: Sequence[str | Path]) -> bool:
    """Whether ``export_dir`` holds an fp32 export of the run's present model and estimators and of the given
    policies (their files unchanged), made by this code, so that it can be reused."""
    path = Path(export_dir) / MANIFEST
    if not path.is_file():
        return False
    m, run = artifacts.read_json(path, "export manifest"), Path(run_dir)
    return (m.get("format") == FORMAT and m.get("dtype") == "fp32" and m.get("code_fingerprint") == code_fingerprint()
            and m.get("model_fingerprint") == artifacts.file_fingerprint(run / MODEL)
            and m.get("estimators_fingerprint") == artifacts.file_fingerprint(run / ESTIMATORS)
            and holds_policies(m, policies))


def holds_policies(manifest: dict, policies: Sequence[str | Path]) -> bool:
    """Whether an export holds each policy file unchanged, under the name ``export_names`` gives it."""
    pols = manifest.get("policies", {})
    return all(name in pols and manifest["files"].get(pols[name]["file"]) == artifacts.file_fingerprint(p)
               for name, p in zip(export_names(policies), policies))
