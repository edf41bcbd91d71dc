"""What a server runs: a run folder under torch, or an export under onnxruntime, behind one small interface.

An engine runs one stage at a time on *rows*, the per-sample arrays between two stages (the stage's input,
the difficulty score, the policy's state): ``begin`` turns a uint8 batch (N, C, H, W) into the rows entering
stage 0, ``step(i, rows)`` runs stage i and its exit and says who leaves, and ``cat``/``take`` join and split
rows, so that the batcher can merge the samples of different requests that reached the same stage.
``OnnxEngine`` never imports torch (``serve --export`` runs in a torch-free process); ``TorchEngine`` loads
torch when it is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dart_ee.core.artifacts import read_json
from dart_ee.core.errors import ConfigError
from dart_ee.core.seal import certificate
from dart_ee.deploy.onnx_runner import OnnxRunner

STATIC = "static"  # the policy name that serves the plain network (no heads): the baseline a loadtest compares with


class Audits(Protocol):
    """Online risk control as the batcher drives it (``dart_ee.adapt.risk.ServedRisk``)."""

    def admit(self, n: int) -> np.ndarray:
        """The audit marks of n new samples (and the policy in force for them)."""
    def result(self, disagrees: bool) -> None: ...
    def observe(self, first_conf: np.ndarray) -> None:
        """The first exit's confidences of samples that ran it (the shift guard's input)."""
    def info(self, update_every: int) -> dict[str, Any]: ...
    def save(self) -> None: ...


class Engine(Protocol):
    """The interface the batcher and the app use."""

    kind: str  # "torch" or "onnxruntime"
    input_shape: tuple[int, ...]  # (C, H, W)
    leave_macs: np.ndarray  # MACs spent by a sample that leaves at each exit
    info: dict[str, Any]  # what is served, for GET /info
    num_steps: int  # stages a sample can run (1: the static network, run whole)
    audits: Audits | None  # online risk control (``--adapt``), or None

    def exit_at(self, step: int) -> int: ...
    def begin(self, x: np.ndarray) -> Any: ...
    def step(self, i: int, rows: Any) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
        """(the rows entering stage i + 1, class, confidence, who leaves here: bool), all in ``rows``' order."""
    def cat(self, parts: list[Any]) -> Any: ...
    def take(self, rows: Any, idx: np.ndarray) -> Any: ...


def describe(policy: str, policy_file: dict | None, leave_macs: np.ndarray, static_macs: float) -> dict[str, Any]:
    """The policy half of /info: its name, its certificate (sealed: an edited file is reported as not certified)
    and the MACs per exit."""
    g = certificate(policy_file) if policy_file else None
    return {"policy": policy,
            "policy_class": (policy_file or {}).get("policy", STATIC),
            "certified": bool(g and g.get("certified")),
            "certificate": g.get("statement") if g else "none: this policy was not certified",
            "max_drop_points": g.get("max_drop") if g else None,
            "confidence": g.get("confidence") if g else None,
            "leave_macs": [float(m) for m in leave_macs],
            "static_macs": static_macs}


class OnnxEngine:
    """An export (``dart-ee export``) under onnxruntime, on the process's shared thread pool (warm across the
    dozen small sessions a batch calls, which decides whether early exit pays at small batches)."""

    kind = "onnxruntime"
    audits: Audits | None = None  # the exported graphs hold the policy's thresholds: it cannot move along its path

    def __init__(self, folder: str | Path, policy: str, threads: int | None = None) -> None:
        self.runner = OnnxRunner(folder, policy=policy, threads=threads, shared_pool=True)
        m, info = self.runner.manifest, self.runner.info
        self.input_shape = self.runner.input_shape
        self.leave_macs = (np.full(m["num_exits"], float(m["static_macs"])) if info["static"]
                           else np.asarray(self.runner.leave_macs, dtype=np.float64))
        policy_file = None if info["static"] else read_json(Path(folder) / info["file"], "exported policy")
        self.info = {"engine": self.kind, "export": str(folder), "run": m.get("run"), "num_exits": m["num_exits"],
                     "input_shape": list(self.input_shape), "dtype": m.get("dtype"),
                     **describe(policy, policy_file, self.leave_macs, float(m["static_macs"]))}
        self.num_steps = self.runner.num_steps

    def exit_at(self, step: int) -> int:
        return self.runner.exit_at(step)

    def begin(self, x: np.ndarray) -> Any:
        return self.runner.begin(x)

    def step(self, i: int, rows: Any) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
        nxt, probs, leave = self.runner.step(i, rows)
        return nxt, probs.argmax(1), probs.max(1), leave

    def cat(self, parts: list[Any]) -> Any:
        return parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def take(self, rows: Any, idx: np.ndarray) -> Any:
        return {k: v[idx] for k, v in rows.items()}


class TorchEngine:
    """A run folder under torch: the inference-optimised model and the eager runner, as ``dart-ee benchmark``
    times it. ``policy``: ``static``, a policy name in RUN/policies, or a policy JSON file."""

    kind = "torch"

    def __init__(self, run: str | Path, policy: str, threads: int | None = None, trust_code: bool | None = None,
                 adapt: bool = False, adapt_state: str | Path | None = None) -> None:
        # torch is imported here, not at the top: a server of an export never loads it
        import torch

        from dart_ee.core.threads import set_threads
        from dart_ee.data.datasets import to_float
        from dart_ee.policies import StaticPolicy, load_policy
        from dart_ee.runs.run import Run
        from dart_ee.runtime.eager import EarlyExitRunner, take_rows

        set_threads(threads)
        r = Run(run, trust_code)
        path = Path(policy) if policy.endswith(".json") else Path(run) / "policies" / f"{policy}.json"
        if policy != STATIC and not path.is_file():
            raise ConfigError(f"--policy {policy!r}: {path} not found; pass `static`, a policy JSON or a name in "
                              f"{Path(run) / 'policies'}")
        pol = StaticPolicy() if policy == STATIC else load_policy(path)
        model = r.model()
        self.runner = EarlyExitRunner(model, pol, r.estimators() if pol.uses_alpha else None)
        self._torch, self._to_float, self._take = torch, to_float, take_rows
        self.num_steps = self.runner.num_steps
        self.input_shape = tuple(int(d) for d in model.input_shape)
        static = float(model.static_macs())
        self.leave_macs = np.full(model.num_exits, static) if policy == STATIC else self.runner.leave_macs()
        self.info = {"engine": self.kind, "run": str(run), "num_exits": model.num_exits,
                     "input_shape": list(self.input_shape), "dtype": "fp32",
                     **describe(path.stem if policy != STATIC else STATIC,
                                None if policy == STATIC else read_json(path, "policy"), self.leave_macs, static)}
        self.audits = self._risk(r, path, adapt_state) if adapt else None

    def _risk(self, run: Any, policy_path: Path, state: str | Path | None) -> Audits:
        """Online risk control of the served policy, with the run's chosen settings (``dart-ee adapt-tune``)."""
        from dart_ee.adapt.risk import RiskController, ServedRisk
        from dart_ee.adapt.settings import load_risk_settings
        from dart_ee.adapt.study import budget_points

        if not policy_path.is_file():
            raise ConfigError("--adapt runs online risk control of a certified policy: serve a policy file, not static")
        rs, _ = load_risk_settings(run.path)
        ctrl = RiskController.from_settings(self.runner.policy, run.trace("cal"), budget_points(policy_path), rs)
        self.info["adapt"] = {"method": "online risk control (dart_ee.adapt.risk)", **rs.model_dump()}
        return ServedRisk(ctrl, self.runner, Path(state) if state else None)

    def exit_at(self, step: int) -> int:
        return self.runner.exit_at(step)

    def begin(self, x: np.ndarray) -> Any:
        return self.runner.begin(self._to_float(self._torch.from_numpy(x)))

    def step(self, i: int, rows: Any) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
        nxt, probs, leave = self.runner.step(i, rows)
        conf, pred = probs.max(1)
        return nxt, pred.numpy(), conf.numpy(), leave.numpy()

    def cat(self, parts: list[Any]) -> Any:
        return parts[0] if len(parts) == 1 else {k: self._torch.cat([p[k] for p in parts]) for k in parts[0]}

    def take(self, rows: Any, idx: np.ndarray) -> Any:
        return self._take(rows, self._torch.from_numpy(idx))


def make_engine(policy: str, run: str | Path | None = None, export: str | Path | None = None,
                threads: int | None = None, trust_code: bool | None = None, adapt: bool = False,
                adapt_state: str | Path | None = None) -> Engine:
    """The engine for ``--run`` (torch) or ``--export`` (onnxruntime); exactly one of them. ``adapt``: online risk
    control of the served policy (torch only), its state kept in ``adapt_state``."""
    if (run is None) == (export is None):
        raise ConfigError("pass exactly one of --run RUN (torch) and --export DIR (onnxruntime)")
    if export is not None:
        if adapt:
            raise ConfigError("--adapt moves the policy's thresholds, which an export holds fixed in its graphs: "
                              "serve the run folder (--run RUN) to adapt")
        return OnnxEngine(export, policy, threads)
    assert run is not None
    return TorchEngine(run, policy, threads, trust_code, adapt, adapt_state)
