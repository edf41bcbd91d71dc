"""Serve an exported run (``dart-ee export``) with onnxruntime, in a process without torch.

``OnnxRunner(folder, policy="dart")`` routes exactly as ``EarlyExitRunner`` does: alpha once per
image, then stage by stage; after each stage the exit's graph gives the softmax, the policy's own
decision graph says who leaves, and the batch is compacted so that only the rest run the next stage.
Only numpy and onnxruntime are imported (``dart_ee`` loads torch lazily), so a serving process
stays small. Every file is checked against the manifest's checksums before it is loaded.

    runner = OnnxRunner("runs/cifar10_alexnet/export", policy="dart")
    res = runner.run(images_uint8)        # res.pred, res.conf, res.exit, res.alpha (numpy, input order)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dart_ee.core.artifacts import file_fingerprint, read_json
from dart_ee.core.errors import ArtifactError, ConfigError, DartError, InputError, check_batch

FORMAT = 1
MANIFEST = "manifest.json"
OPSETS = range(13, 21)  # what `dart-ee export` offers: torch.onnx's TorchScript exporter takes opsets up to 20


@dataclass
class OnnxResult:
    """Per-sample outputs, in input order: ``runtime.ExitResult`` in numpy (that module imports torch)."""

    pred: np.ndarray  # (N,) predicted class
    conf: np.ndarray  # (N,) max softmax at the exit taken
    exit: np.ndarray  # (N,) exit index, 0-based
    alpha: np.ndarray | None  # (N,) difficulty, when the policy uses it


def load_manifest(folder: str | Path, verify: bool = True) -> dict:
    """The export's manifest, with every file it lists checked against its checksum."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path} not found: {folder} is not a finished export; run `dart-ee export --run RUN "
                            f"--out {folder}`")
    m = read_json(path, "export manifest")
    if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("files"), dict):
        raise ArtifactError(f"{path} is not a dart-ee export manifest of format {FORMAT}; export the run again")
    inside = folder.resolve()
    for rel in m["files"]:  # only files inside the export, by relative paths: the manifest cannot point elsewhere
        if not isinstance(rel, str) or Path(rel).is_absolute() or inside not in (folder / rel).resolve().parents:
            raise ArtifactError(f"{path} lists {rel!r}, which is not a file inside {folder}; export the run again")
    for rel, digest in m["files"].items() if verify else ():
        f = folder / rel
        if not f.is_file():
            raise ArtifactError(f"{f} is missing (listed in {path}); export the run again")
        if file_fingerprint(f) != digest:
            raise ArtifactError(f"{f}: checksum does not match {path} (the file changed after export); "
                                "export the run again")
    return m


_POOL: dict[str, int] = {}  # the process's shared pool, once one runner asked for it: {"threads": n}


def shared_pool_active() -> bool:
    """Whether this process runs onnxruntime on one shared thread pool (then every session must use it)."""
    return "threads" in _POOL


def session_options(threads: int | None = None, shared_pool: bool = False) -> Any:
    """onnxruntime session options for a runner's graphs (and for any other session in the same process).

    A runner is a dozen small sessions called one after another. With a pool each, a call wakes the
    pool's sleeping workers, or, if idle workers spin, idle pools take the cores from the busy one; so
    per-session pools here never spin. ``shared_pool=True`` gives every session in the process one
    intra-op pool (onnxruntime's global pool, of ``threads`` workers, 0: its choice) whose workers stay
    warm across the calls: at batch 1 that decides whether early exit pays. onnxruntime allows it only
    for the whole process, sized once, before the process's first session: from then on every session
    must use it, and these options do (the first ``threads`` holds).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if shared_pool and "threads" not in _POOL:
        from onnxruntime.capi import _pybind_state

        _pybind_state.set_global_thread_pool_sizes(threads or 0, 1)
        _POOL["threads"] = threads or 0
    if shared_pool_active():
        opts.use_per_session_threads = False
    else:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return opts


class OnnxRunner:
    """Run an exported multi-exit model under one of its exported policies (``policy=None``: no policy,
    for ``exit_outputs`` only).

    ``providers`` default to CUDA where onnxruntime offers it, then the CPU; ``threads`` sets
    onnxruntime's intra-op threads (default: its own choice); ``shared_pool`` puts every session of the
    process on one thread pool (see ``session_options``): fastest, above all at batch 1, but process-wide.
    """

    def __init__(self, folder: str | Path, policy: str | None = "dart", providers: list[str] | None = None,
                 threads: int | None = None, verify: bool = True, shared_pool: bool = False) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ConfigError("onnxruntime is not installed: pip install 'dart-ee[export]'") from e
        self.folder = Path(folder)
        self.manifest = m = load_manifest(self.folder, verify)
        if policy is not None and policy not in m.get("policies", {}):
            raise ConfigError(f"no policy {policy!r} in {self.folder / MANIFEST}; exported: "
                              f"{', '.join(m.get('policies', {}))}")
        self.policy = policy
        try:
            self._load(ort, m, providers, threads, shared_pool)
        except DartError:
            raise
        except Exception as e:  # a tampered manifest or graph fails in onnx, onnxruntime or here, in every type
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise ArtifactError(f"{self.folder}: the export could not be loaded ({type(e).__name__}: {first}); "
                                "export the run again with `dart-ee export`") from None

    def _load(self, ort: Any, m: dict, providers: list[str] | None, threads: int | None, shared_pool: bool) -> None:
        policy = self.policy
        self.info: dict[str, Any] = m["policies"][policy] if policy else {"static": False, "alpha_source": None,
                                                                          "state": {}, "exits": []}
        self.num_exits = int(m["num_exits"])
        self.input_shape = tuple(int(d) for d in m["input"]["shape"])
        self.leave_macs = np.asarray(self.info.get("leave_macs", m["exit_macs"]), dtype=np.float64)
        opts = session_options(threads, shared_pool)
        self.shared_pool = shared_pool_active()
        avail = ort.get_available_providers()
        providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in avail]

        def session(model: str | bytes, prefix: str | tuple[str, ...] = "") -> _Session:
            source = self._listed(model) if isinstance(model, str) else model
            return _Session(ort.InferenceSession(source, opts, providers=providers), prefix)

        if self.info["static"]:
            self.static = session(self.info.get("graph") or "static.onnx")  # int8 exports keep an fp32 one too
            return
        # exit i's graph: under a policy its head, softmax and decision; the last exit (and policy=None,
        # for traces) the plain head
        early = self.info["exits"] if policy else [f"exit_{i}.onnx" for i in range(self.num_exits - 1)]
        exits = [*early, f"exit_{self.num_exits - 1}.onnx"]
        self.steps = [self._joined(session, f"stage_{i}.onnx", rel) for i, rel in enumerate(exits)]
        if policy is None:  # both difficulty scores: a trace's rows
            self.alpha = {k: session(f"alpha_{k}.onnx") for k in ("paper", "learned")}

    def _listed(self, rel: str) -> str:
        """The path of a graph the manifest names, only if its checksummed file list holds it."""
        if rel not in self.manifest["files"]:
            raise ArtifactError(f"{self.folder / MANIFEST} names {rel!r}, which its checksummed file list does not "
                                "hold; export the run again")
        return str(self.folder / rel)

    def _joined(self, session: Callable[..., _Session], stage: str, exit_graph: str) -> _Session | _Chain:
        """Stage i and exit i as one session: one call per stage (at batch 1 each call's fixed cost is a
        sizeable part of a stage's). Graphs that onnx.compose cannot join (their opsets or IR versions
        differ: a graph from the torch.export fallback) run as two sessions, one after the other."""
        import onnx
        from onnx import compose

        a, b = onnx.load(self._listed(stage)), onnx.load(self._listed(exit_graph))
        try:
            joined = compose.merge_models(a, b, io_map=[("h", "h")], prefix1="stage/", prefix2="exit/",
                                          outputs=["stage/h", *(f"exit/{o.name}" for o in b.graph.output)])
        except ValueError:
            return _Chain(session(stage), session(exit_graph))
        return session(joined.SerializeToString(), prefix=("stage/", "exit/"))

    def check_input(self, x: np.ndarray) -> np.ndarray:
        """float32 pixels in [0, 1] of the exported input shape (uint8 pixels are divided by 255)."""
        x = np.asarray(x)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise InputError(f"expected input of shape (N, {', '.join(map(str, self.input_shape))}), got {x.shape}")
        if len(x) == 0:
            raise InputError("empty batch: pass at least one image")
        if x.dtype == np.uint8:
            return x.astype(np.float32) / np.float32(255)
        if x.dtype != np.float32:
            raise InputError(f"expected uint8 or float32 pixels, got {x.dtype}; pass x.astype(np.float32)")
        lo, hi = float(x.min()), float(x.max())
        if not (lo >= 0 and hi <= 1):  # NaN fails both comparisons
            raise InputError("input contains NaN or Inf pixels" if not (np.isfinite(lo) and np.isfinite(hi)) else
                             f"float pixels must lie in [0, 1] (got {lo:g} .. {hi:g}); pass uint8 pixels or divide by 255")
        return np.ascontiguousarray(x)

    # One batch, stage by stage: ``begin`` gives the rows that enter stage 0, ``step(i, rows)`` runs stage i and its
    # exit on them. Rows are per-sample arrays (the stage's input ``h_in``, ``alpha``, the policy's state), so a
    # caller may split and join them between steps: ``__call__`` compacts one batch, a server's scheduler
    # (``dart_ee.serve.batcher``) merges the samples of several requests that reached the same stage.
    @property
    def num_steps(self) -> int:
        """Stages a sample can run (1 for the static network, a single graph)."""
        return 1 if self.info["static"] else self.num_exits

    def exit_at(self, step: int) -> int:
        """The exit index (0-based) of the samples that leave at ``step``: the last exit for the static network."""
        return self.num_exits - 1 if self.info["static"] else step

    def begin(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The rows of a checked batch, entering stage 0 (``x``: stage 0's input, which the difficulty score reads)."""
        x = self.check_input(x)
        state = {k: np.full(len(x), s["fill"], dtype=s["dtype"]) for k, s in self.info["state"].items()}
        return {"x": x, "h_in": x, **state}

    def step(self, i: int, rows: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """Stage i and its exit on ``rows``: (the rows entering stage i + 1, the exit's softmax, who leaves here);
        at the last step everyone leaves."""
        if self.info["static"]:
            probs = self.static({"x": rows["x"]})["probs"]
            return {}, probs, np.ones(len(probs), dtype=bool)
        out = self.steps[i](rows)
        probs = out["probs"]
        if i == self.num_exits - 1:
            return {}, probs, np.ones(len(probs), dtype=bool)
        nxt = {"h_in": out["h"], **{k: out[f"{k}_out"] for k in self.info["state"]}}
        alpha = out["alpha"] if i == 0 and self.info["alpha_source"] is not None else rows.get("alpha")
        if alpha is not None:
            nxt["alpha"] = alpha
        return nxt, probs, out["leave"].astype(bool)

    def __call__(self, x: np.ndarray) -> OnnxResult:
        rows = self.begin(x)
        n = len(rows["x"])
        pred, conf, exit_idx = np.empty(n, np.int64), np.empty(n, np.float32), np.empty(n, np.int64)
        alpha_all = None
        active = np.arange(n)
        for i in range(self.num_steps):
            rows, probs, leave = self.step(i, rows)
            if i == 0 and "alpha" in rows:
                alpha_all = rows["alpha"]
            go = np.flatnonzero(leave)
            gone = active[go]
            pred[gone], conf[gone], exit_idx[gone] = probs[go].argmax(1), probs[go].max(1), self.exit_at(i)
            if len(go) == len(active):
                break
            if len(go):
                keep = np.flatnonzero(~leave)
                active, rows = active[keep], {k: v[keep] for k, v in rows.items()}
        return OnnxResult(pred, conf, exit_idx, alpha_all)

    def run(self, images: np.ndarray, batch_size: int = 256) -> OnnxResult:
        """Run over many images in batches; results concatenated in input order."""
        check_batch(images, batch_size)
        parts = [self(images[s: s + batch_size]) for s in range(0, len(images), batch_size)]
        alphas = [r.alpha for r in parts if r.alpha is not None]
        return OnnxResult(np.concatenate([r.pred for r in parts]), np.concatenate([r.conf for r in parts]),
                          np.concatenate([r.exit for r in parts]), np.concatenate(alphas) if alphas else None)

    def exit_outputs(self, x: np.ndarray) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
        """Every exit's softmax for every sample (no early exit), and both difficulty scores: a trace's rows."""
        if self.policy is not None:
            raise ConfigError("exit_outputs needs OnnxRunner(folder, policy=None)")
        x = self.check_input(x)
        h, probs, alpha = x, [], {"paper": self.alpha["paper"]({"x": x})["alpha"]}
        for i, step in enumerate(self.steps):
            out = step({"x": x, "h_in": h})
            h = out["h"]
            if i == 0:
                alpha["learned"] = self.alpha["learned"]({"x": x, "h1": h, "logits1": out["logits"]})["alpha"]
            probs.append(out["probs"])
        return probs, alpha


class _Session:
    """An onnxruntime session fed and read by name. Inputs a graph does not declare are left out (the
    exporter drops inputs a graph does not read); ``prefix`` (a joined graph's prefixes) is stripped from
    its names, so that a joined stage and exit read ``x``, ``h_in``, ``alpha`` and give ``h``, ``probs``."""

    def __init__(self, sess: Any, prefix: str | tuple[str, ...] = "") -> None:
        def key(name: str) -> str:
            for p in (prefix,) if isinstance(prefix, str) else prefix:
                name = name.removeprefix(p)
            return name

        self.sess = sess
        self.inputs = [(i.name, key(i.name)) for i in sess.get_inputs()]
        self.outputs = [key(o.name) for o in sess.get_outputs()]

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.sess.run(None, {name: feeds[k] for name, k in self.inputs})))


class _Chain:
    """Two sessions run one after the other, the second reading the first's outputs (``h``)."""

    def __init__(self, first: _Session, second: _Session) -> None:
        self.first, self.second = first, second

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.first(feeds)
        return {**out, **self.second({**feeds, **out})}
