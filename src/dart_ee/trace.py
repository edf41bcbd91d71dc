"""Exit traces: every exit's outputs for every sample of a split, cached once, consumed by every policy.

This is the contract between models and policies. A trace is two files side by side:

``NAME.npz``
    ``probs``     float32 (N, E, K)  softmax probabilities of each of the E exits
    ``labels``    int64   (N,)       true class
    ``index``     int64   (N,)       sample index in the source split (calibration: in the training set)
    ``exit_macs`` int64   (E,)       cumulative MACs to leave at each exit (stages and heads passed)
    ``alpha``     float32 (N,)       difficulty score of the configured estimator (optional)
    any other array with N rows is kept in ``extra``: ``alpha_paper``, ``alpha_learned`` and
    ``terms`` (N, 3: the paper's scaled edge, variance and Laplacian terms)

``NAME.json``
    metadata: ``format`` ("dart-ee-trace"), ``version``, ``split`` ("cal" or "test"), ``n``,
    ``num_exits``, ``num_classes``, the model's architecture, dataset, config name and fingerprint.

``load`` validates all of it. The ``split`` tag lets calibration refuse a test trace.
"""

from __future__ import annotations

import datetime as _dt
import zipfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from dart_ee.core import artifacts
from dart_ee.core.errors import ArtifactError

FORMAT = "dart-ee-trace"
VERSION = 1
SPLITS = ("cal", "test")


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


@dataclass
class Trace:
    probs: np.ndarray
    labels: np.ndarray
    index: np.ndarray
    exit_macs: np.ndarray
    alpha: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.probs = np.asarray(self.probs, dtype=np.float32)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.index = np.asarray(self.index, dtype=np.int64)
        self.exit_macs = np.asarray(self.exit_macs, dtype=np.int64)
        if self.alpha is not None:
            self.alpha = np.asarray(self.alpha, dtype=np.float32)
        self.extra = {k: np.asarray(v) for k, v in self.extra.items()}
        self.validate()

    # -- derived views -------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return int(self.probs.shape[0])

    @property
    def num_exits(self) -> int:
        return int(self.probs.shape[1])

    @property
    def num_classes(self) -> int:
        return int(self.probs.shape[2])

    @property
    def split(self) -> str:
        return str(self.meta.get("split", ""))

    # computed once per trace, read-only: certification reads them for each of hundreds of candidates (a trace's
    # arrays are never edited in place; a changed trace is a new Trace)
    @cached_property
    def preds(self) -> np.ndarray:
        """(N, E) predicted class at each exit."""
        return _frozen(self.probs.argmax(2))

    @cached_property
    def conf(self) -> np.ndarray:
        """(N, E) max-softmax confidence at each exit."""
        return _frozen(self.probs.max(2))

    @property
    def correct(self) -> np.ndarray:
        """(N, E) whether each exit is right."""
        return self.preds == self.labels[:, None]

    def exit_accuracy(self) -> list[float]:
        return [float(a) for a in self.correct.mean(0)]

    def subset(self, idx: np.ndarray) -> Trace:
        return Trace(self.probs[idx], self.labels[idx], self.index[idx], self.exit_macs,
                     None if self.alpha is None else self.alpha[idx], dict(self.meta, n=len(idx)),
                     {k: v[idx] for k, v in self.extra.items()})

    def with_alpha(self, name: str) -> Trace:
        """A copy whose ``alpha`` is the named score (``alpha_paper``, ``alpha_learned``), costs adjusted to match."""
        if name not in self.extra:
            raise ArtifactError(f"trace has no {name!r} scores; it holds {sorted(self.extra)}")
        source = name.removeprefix("alpha_")
        est = self.meta.get("estimator_macs", {})
        macs = self.exit_macs - est.get(self.meta.get("difficulty"), 0) + est.get(source, 0)
        return Trace(self.probs, self.labels, self.index, macs, self.extra[name], dict(self.meta, difficulty=source),
                     self.extra)

    def validate(self, where: str = "trace") -> None:
        p = self.probs
        if p.ndim != 3 or p.shape[1] < 1 or p.shape[2] < 2:
            raise ArtifactError(f"{where}: probs must have shape (N, exits, classes), got {p.shape}")
        n, e, k = p.shape
        for name, arr, shape in (("labels", self.labels, (n,)), ("index", self.index, (n,)),
                                 ("exit_macs", self.exit_macs, (e,))):
            if arr.shape != shape:
                raise ArtifactError(f"{where}: {name} has shape {arr.shape}, expected {shape}")
        if self.alpha is not None and self.alpha.shape != (n,):
            raise ArtifactError(f"{where}: alpha has shape {self.alpha.shape}, expected {(n,)}")
        for name, v in self.extra.items():
            if v.shape[:1] != (n,):
                raise ArtifactError(f"{where}: {name} has {v.shape[:1]} rows, expected {n}")
        if n and (self.labels.min() < 0 or self.labels.max() >= k):
            raise ArtifactError(f"{where}: labels must lie in [0, {k})")
        if not np.isfinite(p).all() or (n and (p.min() < 0 or p.max() > 1.0001)):
            raise ArtifactError(f"{where}: probs must be finite probabilities in [0, 1]")
        if np.any(np.diff(self.exit_macs) <= 0):
            raise ArtifactError(f"{where}: exit_macs must increase strictly, got {self.exit_macs.tolist()}")
        split = self.meta.get("split")
        if split is not None and split not in SPLITS:
            raise ArtifactError(f"{where}: split tag must be one of {SPLITS}, got {split!r}")


def _paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".npz", ".json") else p
    return stem.with_suffix(".npz"), stem.with_suffix(".json")


def save(trace: Trace, path: str | Path) -> Path:
    """Write ``path`` (.npz) and its .json metadata atomically."""
    npz, meta_path = _paths(path)
    arrays = {"probs": trace.probs, "labels": trace.labels, "index": trace.index, "exit_macs": trace.exit_macs}
    if trace.alpha is not None:
        arrays["alpha"] = trace.alpha
    arrays.update(trace.extra)
    meta = {"format": FORMAT, "version": VERSION, **trace.meta, "n": trace.n, "num_exits": trace.num_exits,
            "num_classes": trace.num_classes, "has_alpha": trace.alpha is not None}
    meta.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    artifacts.atomic_write(npz, lambda p: np.savez(p.open("wb"), **arrays))  # type: ignore[arg-type]  # numpy stubs
    artifacts.write_json(meta_path, meta)
    return npz


def load(path: str | Path, expect_split: str | None = None) -> Trace:
    """Load and validate a trace; ``expect_split`` ("cal"/"test") refuses a trace of another split."""
    npz, meta_path = _paths(path)
    meta = artifacts.read_json(meta_path, "trace metadata")
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{meta_path} is not a dart-ee trace (format={meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise ArtifactError(f"{meta_path}: trace version {meta.get('version')} is not supported (expected "
                            f"{VERSION}); regenerate it with `dart-ee trace`")
    if not npz.is_file():
        raise ArtifactError(f"trace arrays not found: {npz}")
    try:
        with np.load(npz) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ArtifactError(f"{npz}: unreadable trace ({e}); regenerate it with `dart-ee trace`") from e
    missing = {"probs", "labels", "index", "exit_macs"} - set(arrays)
    if missing:
        raise ArtifactError(f"{npz}: missing arrays {sorted(missing)}")
    core = ("probs", "labels", "index", "exit_macs", "alpha")
    trace = Trace(arrays["probs"], arrays["labels"], arrays["index"], arrays["exit_macs"], arrays.get("alpha"),
                  {k: v for k, v in meta.items() if k not in ("format", "version")},
                  {k: v for k, v in arrays.items() if k not in core})
    if trace.n != meta.get("n") or trace.num_exits != meta.get("num_exits"):
        raise ArtifactError(f"{npz}: arrays ({trace.n} samples, {trace.num_exits} exits) disagree with "
                            f"{meta_path} ({meta.get('n')}, {meta.get('num_exits')}); regenerate the trace")
    _check_contents(trace, str(npz))
    if expect_split is not None and trace.split != expect_split:
        raise ArtifactError(f"{npz} is a {trace.split!r} trace, but a {expect_split!r} trace is required here"
                            + (": never calibrate on the test split" if expect_split == "cal" else ""))
    return trace


def _check_contents(trace: Trace, where: str) -> None:
    """What a file can hold that ``Trace.validate`` (the structure) lets through: no samples, rows that are not
    distributions, non-finite difficulty scores, a last exit that does not reach the whole network."""
    if trace.n == 0:
        raise ArtifactError(f"{where} holds no sample; trace a split with at least one image (`dart-ee trace`)")
    # softmax rows sum to 1 up to rounding: float32 ~1e-6, float16 storage (kept traces) at most 2^-12 an entry
    tol = 1e-3 + trace.num_classes * 2.0 ** -12
    worst = float(np.abs(trace.probs.astype(np.float64).sum(2) - 1).max())
    if worst > tol:
        raise ArtifactError(f"{where}: probs must be softmax rows that sum to 1 (within {tol:.4f}); one is off by "
                            f"{worst:.4f}. Store each exit's softmax, not its logits")
    for name, arr in (("alpha", trace.alpha), *trace.extra.items()):
        if arr is not None and name.startswith("alpha") and not np.isfinite(arr).all():
            raise ArtifactError(f"{where}: {name} holds NaN or infinite difficulty scores; regenerate the trace")
    static = trace.meta.get("static_macs")
    if isinstance(static, (int, float)) and trace.exit_macs[-1] < static:
        raise ArtifactError(f"{where}: its last exit costs {int(trace.exit_macs[-1]):,} MACs, less than the whole "
                            f"network's {int(static):,} (static_macs): exits are missing (a truncated trace?); "
                            "regenerate it with `dart-ee trace`")


def check_pair(cal: Trace, test: Trace, cal_where: str = "calibration trace", test_where: str = "test trace") -> None:
    """A calibration and a test trace combined in one result must come from one run: same model, data and exits."""
    if cal.num_exits != test.num_exits:
        raise ArtifactError(f"{cal_where} has {cal.num_exits} exits but {test_where} has {test.num_exits}: "
                            "pass the two traces of one run")
    for key, what in (("dataset", "dataset"), ("model", "model"), ("config_fingerprint", "config")):
        a, b = cal.meta.get(key), test.meta.get(key)
        if a is not None and b is not None and a != b:
            raise ArtifactError(f"{cal_where} and {test_where} come from different runs (their {what} differs: "
                                f"{cal.meta.get('run', '?')} vs {test.meta.get('run', '?')}); pass the two traces of one run")
