"""Wall-clock measurements. Every figure is a median of repeated, alternating runs in one process."""

from __future__ import annotations

import functools
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dart_ee.adapt.controller import controller_for_run
from dart_ee.adapt.settings import load_settings
from dart_ee.bench.energy import energy_meter
from dart_ee.bench.timing import alternate, alternate_singles, median_ratio_ci, time_exported
from dart_ee.core.artifacts import file_fingerprint
from dart_ee.core.errors import ConfigError
from dart_ee.core.malloc import freed_memory_kept, keep_freed_memory, malloc_setting
from dart_ee.core.provenance import command_line, git_revision, hardware_info
from dart_ee.core.runfiles import MODEL, POLICY_DIR
from dart_ee.core.threads import set_threads
from dart_ee.data.datasets import get_spec, to_float
from dart_ee.deploy.export import export_names, export_run, holds_policies, is_current
from dart_ee.deploy.onnx_runner import MANIFEST, OnnxRunner, load_manifest
from dart_ee.difficulty.estimators import DifficultyEstimator, LearnedDifficulty
from dart_ee.models.net import MultiExitNet, create_model, optimize_for_inference
from dart_ee.policies import ExitPolicy, StaticPolicy, load_policy
from dart_ee.runs.run import Run
from dart_ee.runtime.eager import EarlyExitRunner
from dart_ee.runtime.queued import QueuedRunner


@torch.inference_mode()
def difficulty_cost(model_name: str = "alexnet", dataset: str = "cifar10", repeats: int = 20,
                    threads: int | None = None) -> dict:
    """FLOPs of the paper's estimator, and its wall-clock share of a full forward pass at batch 1 and 256."""
    n_threads = set_threads(threads)
    spec = get_spec(dataset)
    shape = (spec.in_channels, spec.image_size, spec.image_size)
    # the inference-optimised network is the one the runtime runs, so the share is against it
    model = optimize_for_inference(create_model(model_name, spec.num_classes, *shape[:1], spec.image_size))
    gen = torch.Generator().manual_seed(0)
    est = DifficultyEstimator().fit((torch.rand(512, *shape, generator=gen) * 255).to(torch.uint8))
    timing = []
    for bs in (1, 256):
        x = torch.rand(bs, *shape, generator=gen)
        t, _ = alternate({"estimator": functools.partial(est, x), "model": functools.partial(model.forward_static, x)},
                         repeats if bs > 1 else 5 * repeats, warmup=3)
        e, m = statistics.median(t["estimator"]), statistics.median(t["model"])
        timing.append({"batch_size": bs, "estimator_ms": 1e3 * e, "model_ms": 1e3 * m, "share": e / m})
    return {"model": model_name, "dataset": dataset, "threads": n_threads, "torch": torch.__version__,
            "flops": est.flops(shape), "timing": timing,
            "note": "median of alternating runs after warm-up; model = static forward (no exit heads), fp32, "
                    "inference-optimised (BatchNorm folded, channels_last)"}


# ----------------------------------------------------------------------------------------------
# Runtime benchmark: static network vs fitted policies, measured in one process


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _percentile(v: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(v), q))


def timing_sample(n: int, k: int, seed: int = 0) -> np.ndarray:
    """``k`` indices into a split of ``n`` images: a seeded random order of the split, repeated while ``k > n``
    (each repetition a new order). Timing a prefix of a class-sorted split would time some classes only."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.permutation(n) for _ in range(-(-k // n))])[:k]


@dataclass
class _Setup:
    """What every phase of ``benchmark`` reads: the run's network, its test images and the methods timed."""

    run_dir: Path
    dev: torch.device
    threads: int
    batch_size: int
    repeats: int
    runners: Sequence[str]
    model: MultiExitNet
    est: LearnedDifficulty
    all_x: torch.Tensor  # the whole test split, uint8
    labels: np.ndarray
    methods: dict[str, ExitPolicy]  # method -> policy ("static" first)
    eager: dict[str, Any]  # method -> EarlyExitRunner
    onnx: dict[str, Any]  # method -> OnnxRunner (onnxruntime only)
    keys: list[tuple[str, str]]  # (runner, method), in the record's order
    exit_macs: np.ndarray
    static_macs: float
    est_macs: dict[str, int]

    def summary(self, name: str, pred: np.ndarray, exits: np.ndarray) -> dict:
        """Accuracy, exits and MAC-predicted speedup of one method's decisions on the test split."""
        costs = self.methods[name].leave_costs(self.exit_macs, self.static_macs, self.est_macs)
        macs = float(costs[exits].mean())
        return {"method": name, "accuracy": float((pred == self.labels).mean()), "macs_per_image": macs,
                "exit_histogram": np.bincount(exits, minlength=len(self.exit_macs)).tolist(),
                "mac_speedup": self.static_macs / macs}


def benchmark(run_dir: str | Path, policy_paths: Sequence[str | Path], batch_size: int = 256, n_images: int = 2560,
              repeats: int = 5, latency_images: int = 1000, threads: int | None = None, device: str = "cpu",
              data_dir: str | Path | None = None, memory: bool = False,
              runners: Sequence[str] = ("eager",), profile: bool = True, export_dir: str | Path | None = None) -> dict:
    """Time the static network against each fitted policy on the run's test images (see ``dart-ee benchmark``).

    ``runners``: "eager" (``EarlyExitRunner``: each batch compacted stage by stage), "queued"
    (``QueuedRunner``: a queue per stage, full batches, CUDA graphs on a GPU) and/or "onnxruntime"
    (``OnnxRunner`` on the run's export in ``export_dir``, default ``RUN/export``, re-exported when it is
    not current). Each runner times its own static network (captured too under "queued"; the exported
    static graph under "onnxruntime"), and every method and runner alternates in one process.
    The record's hardware "malloc" says how freed memory was treated (``dart_ee.core.malloc``; the ``dart-ee`` command
    keeps it, as it should be kept in serving).

    The phases: set up, decisions on the whole split, throughput at the batch size, latency at batch 1,
    then each row's ratios against its runner's static network.
    """
    b = _setup(Path(run_dir), policy_paths, batch_size, repeats, threads, device, data_dir, runners, export_dir)
    rows, exits_of = _decisions(b)
    # throughput at batch_size: at least 4 full batches, the test split repeated if it is smaller. The images
    # are a seeded random draw, not the split's first ones: image folders list the test split by class, and
    # the first 2,560 CIFAR-10 images are airplanes, cars and birds, whose exits are not the split's
    n_timed = max(n_images, 4 * batch_size)
    x = to_float(b.all_x[torch.from_numpy(timing_sample(len(b.all_x), n_timed))]).to(b.dev)
    t_per_img, e_per_img, energy_source, costs = _throughput(b, x, rows, profile)
    # latency at batch size 1: alternating per image, on the first images of the same random draw
    lat, lat_exits, ort_in_torch = _latency(b, x, latency_images, t_per_img, e_per_img)
    with torch.inference_mode():
        mean_alpha = float(torch.cat([b.est.paper(to_float(b.all_x[s: s + 1000]).to(b.dev))
                                      for s in range(0, len(b.all_x), 1000)]).mean())
    for k, row in rows.items():
        _ratios(b, k, row, t_per_img, e_per_img, lat, lat_exits, costs, exits_of, mean_alpha)
    if memory:
        _add_memory({m: rows[b.runners[0], m] for m in b.methods}, b.run_dir, policy_paths, b.methods, b.all_x,
                    batch_size, b.threads, device)
    return _record(b, rows, x, min(latency_images, len(x)), repeats, energy_source, mean_alpha, costs, ort_in_torch)


def _setup(run_dir: Path, policy_paths: Sequence[str | Path], batch_size: int, repeats: int, threads: int | None,
           device: str, data_dir: str | Path | None, runners: Sequence[str], export_dir: str | Path | None) -> _Setup:
    """Load the run and the policies; a runner per method (distinct rows for policy files of one name)."""
    unknown = sorted(set(runners) - {"eager", "queued", "onnxruntime"})
    if unknown or not runners:
        raise ConfigError(f"unknown runner(s) {unknown or list(runners)}: choose eager, queued and/or onnxruntime")
    n_threads = set_threads(threads)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but torch sees no GPU here; use --device cpu")
    run = Run(run_dir)
    model, est, test = run.model(device=dev), run.estimators(dev), run.test_images(data_dir)
    methods: dict[str, ExitPolicy] = {"static": StaticPolicy()}
    exported = {"static": "static"}  # method -> its name in the export
    for p, as_exported in zip(policy_paths, export_names(policy_paths)):
        pol = load_policy(p)
        name = pol.name if pol.name not in methods else as_exported
        methods[name], exported[name] = pol, as_exported
    onnx = _onnx_runners(run_dir, export_dir, policy_paths, exported, n_threads) if "onnxruntime" in runners else {}
    keys = [(r, k) for r in runners for k in methods]
    if "static_fp32" in onnx:  # an int8 export's fp32 network
        keys.append(("onnxruntime", "static_fp32"))
        methods["static_fp32"] = StaticPolicy()
    return _Setup(run_dir, dev, n_threads, batch_size, repeats, runners, model, est, torch.from_numpy(test.x),
                  np.asarray(test.y), methods, {k: EarlyExitRunner(model, pol, est) for k, pol in methods.items()
                                                 if k != "static_fp32"},
                  onnx, keys, np.asarray(model.exit_macs(), dtype=np.float64), float(model.static_macs()),
                  est.macs(model))


def _decisions(b: _Setup) -> tuple[dict[tuple[str, str], dict], dict[str, np.ndarray]]:
    """Accuracy, exits and MAC-predicted speedup over the whole test split, from the eager runner (the trace's
    semantics); the queued and onnxruntime runners' decisions are compared with it sample by sample."""
    rows: dict[tuple[str, str], dict] = {}
    exits_of: dict[str, np.ndarray] = {}
    for name, runner in b.eager.items():
        res = runner.run(b.all_x, b.batch_size)
        pred, exits = res.pred.cpu().numpy(), res.exit.cpu().numpy()
        exits_of[name] = exits
        for r in b.runners:
            rows[r, name] = {**b.summary(name, pred, exits), "runner": r}
        others = {}
        if "queued" in b.runners:
            qres = QueuedRunner(b.model, b.methods[name], b.est, b.batch_size).run(b.all_x)
            others["queued"] = (qres.pred.cpu().numpy(), qres.exit.cpu().numpy())
        if b.onnx:
            ores = b.onnx[name].run(b.all_x.numpy(), b.batch_size)
            others["onnxruntime"] = (ores.pred, ores.exit)
            rows["onnxruntime", name].update(b.summary(name, ores.pred, ores.exit))  # the engine's own accuracy
        for r, (other_pred, other_exits) in others.items():
            rows[r, name]["decisions_differing_from_eager"] = int(((other_pred != pred) | (other_exits != exits)).sum())
    if "static_fp32" in b.onnx:
        ores = b.onnx["static_fp32"].run(b.all_x.numpy(), b.batch_size)
        rows["onnxruntime", "static_fp32"] = {**b.summary("static_fp32", ores.pred, ores.exit), "runner": "onnxruntime"}
    return {k: rows[k] for k in b.keys}, exits_of  # by runner, then method


def _throughput(b: _Setup, x: torch.Tensor, rows: dict, profile: bool) -> tuple[dict, dict, str, dict | None]:
    """Per-image times (and energy, where readable) of the torch runners at the batch size, methods alternating;
    what the stages' own times predict; with ``profile``, where the queued runner's time goes."""
    batches = [x[s: s + b.batch_size] for s in range(0, len(x), b.batch_size)]
    queued = ({k: QueuedRunner(b.model, pol, b.est, b.batch_size) for k, pol in b.methods.items()}
              if "queued" in b.runners else {})

    def throughput(key: tuple[str, str]) -> Callable[[], object]:
        if key[0] == "queued":
            return functools.partial(queued[key[1]].run, x)
        runner = b.eager[key[1]]
        return lambda: [runner(batch) for batch in batches]

    # torch runners here; onnxruntime in a process of its own, as it is served (dart_ee.bench.timing says why), and
    # where torch's OpenMP workers cannot take the cores from its pool
    torch_keys = [k for k in b.keys if k[0] != "onnxruntime"]
    meter = energy_meter(b.dev)
    t_per_img, e_per_img = alternate({k: throughput(k) for k in torch_keys}, b.repeats, len(x), lambda: _sync(b.dev),
                                     meter.read)
    # the speedup a torch runner with no overhead of its own would reach on this device
    costs = stage_costs(b.model, x[:b.batch_size], b.est, b.repeats) if torch_keys else None
    if profile and queued:  # a separate pass: the per-stage syncs would slow the timed one
        for name, pol in b.methods.items():
            q = QueuedRunner(b.model, pol, b.est, b.batch_size, profile=True)
            q.run(x[: 4 * b.batch_size])  # warm-up: on a GPU this captures the graphs, which must not be timed
            q.reset_stats()
            q.run(x)
            rows["queued", name]["stages"] = [
                {"stage": i + 1, "calls": st["calls"], "fill": st["samples"] / max(st["calls"] * b.batch_size, 1),
                 "ms_per_image": 1e3 * st["seconds"] / len(x)} for i, st in enumerate(q.stage_stats)]
    return t_per_img, e_per_img, meter.source, costs


def _latency(b: _Setup, x: torch.Tensor, n: int, t_per_img: dict, e_per_img: dict) -> tuple[dict, dict, bool | None]:
    """Batch-1 times and exits on the first ``n`` images of ``x``, methods alternating per image. onnxruntime's
    throughput (on ``x``) and latency both come from a process of its own, merged into ``t_per_img``; the last
    value says whether that process had imported torch."""
    singles = x[:n]

    def on_image(run: Callable[[torch.Tensor], Any]) -> Callable[[int], Any]:
        return lambda j: run(singles[j: j + 1])

    torch_keys = [k for k in b.keys if k[0] != "onnxruntime"]
    latency = {k: on_image(QueuedRunner(b.model, b.methods[k[1]], b.est, 1).run if k[0] == "queued" else b.eager[k[1]])
               for k in torch_keys}  # queued: a queue of one, each stage runs as soon as its one sample arrives
    lat, lat_exits = alternate_singles(latency, len(singles), lambda: _sync(b.dev))
    if not b.onnx:
        return lat, lat_exits, None
    names = {m: r.policy for m, r in b.onnx.items()}
    ort = time_exported(str(next(iter(b.onnx.values())).folder), names, x.cpu().numpy(), b.batch_size, b.repeats,
                        len(singles), b.threads)
    for part, into in (("seconds", t_per_img), ("latency", lat), ("latency_exits", lat_exits)):
        into.update({("onnxruntime", m): v for m, v in ort[part].items()})
    e_per_img.update({("onnxruntime", m): [] for m in names})  # energy is not read in that process
    return lat, lat_exits, ort["torch_imported"]


def _ratios(b: _Setup, k: tuple[str, str], row: dict, t_per_img: dict, e_per_img: dict, lat: dict, lat_exits: dict,
            costs: dict | None, exits_of: dict[str, np.ndarray], mean_alpha: float) -> None:
    """A row's times and its ratios against the static network timed by the same runner (and DAES)."""
    static = (k[0], "static")
    t, t_static = statistics.median(t_per_img[k]), statistics.median(t_per_img[static])
    if k[0] == "onnxruntime" and "static_fp32" in b.onnx:  # int8 against the fp32 network too
        row["speedup_vs_fp32_static"] = statistics.median(t_per_img["onnxruntime", "static_fp32"]) / t
        if lat[k]:
            row["latency_speedup_vs_fp32_static"] = (statistics.median(lat["onnxruntime", "static_fp32"])
                                                     / statistics.median(lat[k]))
    e = statistics.median(e_per_img[k]) if e_per_img[k] else None
    e_static = statistics.median(e_per_img[static]) if e_per_img[static] else None
    row.update({
        "time_ms": 1e3 * t, "time_ms_min": 1e3 * min(t_per_img[k]), "time_ms_max": 1e3 * max(t_per_img[k]),
        "speedup": t_static / t, "speedup_vs_mac_prediction": (t_static / t) / row["mac_speedup"],
        "energy_mj": None if e is None else 1e3 * e, "power_w": None if e is None else e / t,
        "power_efficiency": None if e is None or e_static is None else e_static / e,
    })
    if lat[k]:
        row.update({"latency_p50_ms": 1e3 * statistics.median(lat[k]), "latency_p95_ms": 1e3 * _percentile(lat[k], 95),
                    "latency_speedup": statistics.median(lat[static]) / statistics.median(lat[k]),
                    "latency_speedup_ci95": median_ratio_ci(lat[static], lat[k])})
        row["latency_speedup_vs_mac_prediction"] = row["latency_speedup"] / row["mac_speedup"]
        row["latency_exit_histogram"] = np.bincount(lat_exits[k], minlength=len(b.exit_macs)).tolist()
    if costs and k[0] != "onnxruntime":
        row["stage_time_speedup"] = stage_time_speedup(costs, b.methods[k[1]], exits_of[k[1]])
        row["speedup_vs_stage_time_prediction"] = row["speedup"] / row["stage_time_speedup"]
    pe = row["power_efficiency"]
    row["daes"] = row["accuracy"] * row["speedup"] * (pe if pe is not None else 1.0) / (1 + mean_alpha)
    row["daes_note"] = "measured energy" if pe is not None else "energy unavailable: power efficiency taken as 1"


def _record(b: _Setup, rows: dict, x: torch.Tensor, n_latency: int, repeats: int, energy_source: str,
            mean_alpha: float, costs: dict | None, ort_in_torch: bool | None) -> dict:
    """The benchmark record: provenance, settings, one row per (runner, method), and how it was measured."""
    graphs = b.dev.type == "cuda"
    return {
        "command": command_line(), "hardware": hardware_info(b.dev), "threads": b.threads, "torch": torch.__version__,
        "git_revision": git_revision(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "run": str(b.run_dir),
        "config": Run(b.run_dir).config().model_dump(mode="json"),
        "batch_size": b.batch_size, "timed_images": len(x), "image_sample": "a seeded random draw of the test split",
        "accuracy_images": len(b.all_x), "repeats": repeats,
        "latency_images": n_latency, "energy_source": energy_source, "mean_alpha_paper": mean_alpha,
        "static_macs": b.static_macs, "runners": list(b.runners), "rows": list(rows.values()), "stage_costs": costs,
        "onnx_export": {**_export_summary(next(iter(b.onnx.values()))), "timed_in_process_with_torch": ort_in_torch}
        if b.onnx else None,
        "cuda_graphs": graphs if "queued" in b.runners else None,
        "method": "throughput: median over R alternating repetitions of the per-image time at the given batch size, "
                  "after warm-up; latency: batch size 1, methods alternating per image; speedup = T_static / T_m "
                  "with the static network timed by the same runner; MAC speedup = static MACs / expected MACs "
                  "(heads and estimator included); stage-time speedup = the same rule with each stage's, head's "
                  "and estimator's median time alone at the batch size (stage_costs) in place of its MACs"
                  + ("" if "queued" not in b.runners else
                  "; queued runner: " + ("stages captured as CUDA graphs" if graphs else
                                         "eager stage calls (CUDA graphs need a GPU; capture skipped on the CPU)")),
    }


def _onnx_runners(run_dir: Path, export_dir: str | Path | None, policy_paths: Sequence[str | Path],
                  exported: dict[str, str], threads: int) -> dict:
    """An ``OnnxRunner`` per method, on ``export_dir`` (default: the run's own, ``RUN/export``). The default is
    made again first when it is not current (another model, estimator, policy or exporting code), unless it
    is an int8 export (re-exporting would overwrite it). A folder the user named is never written: it must
    already hold the run's model and the named policy files, else the command to make it is printed."""

    named, export_dir = export_dir is not None, Path(export_dir or run_dir / "export")
    if named:
        m = load_manifest(export_dir) if (export_dir / MANIFEST).is_file() else {}
        if m.get("model_fingerprint") != file_fingerprint(run_dir / MODEL) or not holds_policies(m, policy_paths):
            mine = ", ".join(f"{export_dir}/{POLICY_DIR}/{n}.json" for n in m.get("policies", {}) if "static" not in n)
            raise ConfigError(
                f"{export_dir} does not hold this run's model and the policy files named, and benchmark never writes "
                f"into a folder you name: export them there first (`dart-ee export --run {run_dir} --out {export_dir} "
                f"{' '.join(f'--policy {p}' for p in policy_paths)}`), or measure the export's own policies "
                f"(--policy {mine or '...'})")
    else:
        dtype = load_manifest(export_dir)["dtype"] if (export_dir / MANIFEST).is_file() else None
        if dtype not in (None, "fp32"):
            raise ConfigError(f"{export_dir} holds an {dtype} export, which re-exporting would overwrite: pass "
                              f"--export {export_dir} to measure it, or move it")
        if not is_current(export_dir, run_dir, policy_paths):
            export_run(run_dir, export_dir, policies=policy_paths)
        m = load_manifest(export_dir)
    if "static_fp32" in m["policies"]:  # an int8 export: its fp32 network is the baseline too
        exported = {**exported, "static_fp32": "static_fp32"}
    # one thread pool for all of them: the fastest way to serve an export (see onnx_runner.session_options)
    return {m: OnnxRunner(export_dir, name, threads=threads, shared_pool=True) for m, name in exported.items()}


def _export_summary(runner: Any) -> dict:
    import onnxruntime as ort

    m = runner.manifest
    return {"folder": str(runner.folder), "dtype": m["dtype"], "opset": m["opset"], "onnxruntime": ort.__version__,
            "shared_thread_pool": runner.shared_pool, "model_fingerprint": m["model_fingerprint"], "int8": m.get("int8")}


def _memory_child(run_dir: str, policy_path: str | None, images_path: str, batch_size: int, threads: int,
                  device: str, keep_memory: bool) -> dict:
    """In a fresh process: peak RSS while running one method over the images (returned to the parent), with
    freed memory kept or not as in the parent (kept, the process holds its peak: the figure that matters)."""

    if keep_memory:
        keep_freed_memory()
    torch.set_num_threads(threads)
    run = Run(run_dir)
    pol = load_policy(policy_path) if policy_path else StaticPolicy()
    runner = EarlyExitRunner(run.model(device=device), pol, run.estimators(device))
    images = torch.from_numpy(np.load(images_path))
    base = _status_bytes("VmRSS")
    for s in range(0, len(images), batch_size):
        runner(to_float(images[s: s + batch_size]).to(device))
    peak = _status_bytes("VmHWM")
    return {"peak_rss_mb": peak / 2**20, "rss_before_mb": base / 2**20, "increase_mb": (peak - base) / 2**20,
            "malloc": malloc_setting()}


def _status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status. VmHWM, the peak RSS, is this process's own: getrusage's
    ru_maxrss also counts the parent's RSS at the fork before the spawned child's exec, which is larger than the
    child's peak when the parent keeps its freed memory."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # in kB
    raise RuntimeError(f"/proc/self/status has no {field}: peak memory is measured on Linux only")


def _add_memory(rows: dict, run_dir: Path, policy_paths: Sequence[str | Path], methods: dict, images: torch.Tensor,
                batch_size: int, threads: int, device: str) -> None:
    """Peak memory of each method on the images, each in its own process so peaks don't mix."""
    import multiprocessing as mp
    import tempfile

    paths = {"static": None, **{n: str(p) for n, p in zip(list(methods)[1:], policy_paths)}}
    with tempfile.TemporaryDirectory() as tmp:
        img_path = os.path.join(tmp, "images.npy")
        np.save(img_path, images.numpy())
        ctx = mp.get_context("spawn")
        with ctx.Pool(1, maxtasksperchild=1) as pool:
            for name, pp in paths.items():
                rows[name]["memory"] = pool.apply(_memory_child, (str(run_dir), pp, img_path, batch_size, threads, device,
                                                                    freed_memory_kept()))
    static = rows["static"]["memory"]
    for row in rows.values():
        m = row["memory"]
        m["peak_ratio_vs_static"] = m["peak_rss_mb"] / static["peak_rss_mb"]
        m["increase_ratio_vs_static"] = m["increase_mb"] / max(static["increase_mb"], 1e-9)
        m["images"] = len(images)


def table_markdown(rec: dict) -> str:
    """The paper's Table I columns, plus the MAC-predicted speedup and batch-1 latency (and the runner, if several)."""
    def fmt(v: float | None, spec: str) -> str:
        return "unavailable" if v is None else format(v, spec)

    several = len(rec.get("runners", ["eager"])) > 1
    priced = any("stage_time_speedup" in r for r in rec["rows"])  # records before stage_costs lack the column
    lines = [("| Runner " if several else "") + "| Method | Accuracy | Time (ms/img) | Energy (mJ/img) | Power (W) | Speedup "
             "| MAC-predicted speedup | Speedup / MAC prediction " + ("| Stage-time-predicted speedup " if priced else "")
             + "| Power efficiency | DAES | Latency p50 / p95 (ms, bs=1) | Latency speedup |",
             "|---" * (12 + priced + several) + "|"]
    for r in rec["rows"]:
        daes = f"{r['daes']:.3f}" + ("" if r["power_efficiency"] is not None else " (PE=1: energy unavailable)")
        lat = (f"{r['latency_p50_ms']:.2f} / {r['latency_p95_ms']:.2f} | {r['latency_speedup']:.2f}x"
               if "latency_p50_ms" in r else "n/a | n/a")
        stage = (f"{r['stage_time_speedup']:.2f}x | " if "stage_time_speedup" in r else "n/a | ") if priced else ""
        lines.append((f"| {r.get('runner', 'eager')} " if several else "") +
                     f"| {r['method']} | {100 * r['accuracy']:.2f}% | {r['time_ms']:.4f} | {fmt(r['energy_mj'], '.3f')} | "
                     f"{fmt(r['power_w'], '.1f')} | {r['speedup']:.2f}x | {r['mac_speedup']:.2f}x | "
                     f"{r['speedup_vs_mac_prediction']:.2f} | {stage}{fmt(r['power_efficiency'], '.2f')} | {daes} | {lat} |")
    return "\n".join(lines)


def training_speed(model_name: str = "alexnet", dataset: str = "cifar10", batch_size: int = 256, steps: int = 6,
                   threads: int | None = None) -> dict:
    """ms per training step for fp32 / bf16 autocast x NCHW / channels_last (median after 2 warm-up steps)."""
    import torch.nn.functional as F

    n_threads = set_threads(threads)
    spec = get_spec(dataset)
    rows = []
    for channels_last in (False, True):
        for bf16 in (False, True):
            torch.manual_seed(0)
            model = create_model(model_name, spec.num_classes, spec.in_channels, spec.image_size).train()
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            model = model.to(memory_format=fmt)  # type: ignore[call-overload]  # the stubs lack memory_format
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
            x = torch.rand(batch_size, spec.in_channels, spec.image_size, spec.image_size).to(memory_format=fmt)
            y = torch.randint(0, spec.num_classes, (batch_size,))
            times = []
            for _ in range(steps + 2):
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = torch.stack([F.cross_entropy(z.float(), y) for z in model(x)]).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
                times.append(time.perf_counter() - t0)
            rows.append({"bf16": bf16, "channels_last": channels_last, "ms_per_step": 1e3 * statistics.median(times[2:])})
    base = rows[0]["ms_per_step"]
    for r in rows:
        r["speedup_vs_fp32_nchw"] = base / r["ms_per_step"]
    return {"model": model_name, "dataset": dataset, "batch_size": batch_size, "threads": n_threads,
            "torch": torch.__version__, "rows": rows}


@torch.inference_mode()
def stage_costs(model: MultiExitNet, x: torch.Tensor, estimator: LearnedDifficulty | None = None,
                repeats: int = 5) -> dict:
    """Milliseconds per image of each stage, each exit head, the plain network and the difficulty estimators, each
    timed alone on the batch ``x`` (alternating, median after warm-up): the device's own price of every step
    that the MAC count stands in for. With these prices in place of MACs, the cost rule
    (``ExitPolicy.leave_costs``) predicts what a runner with no overhead of its own would reach."""
    feats, h = [], x
    for stage in model.stages:  # each stage's input (and the last one's output), computed once
        feats.append(h)
        h = stage(h)
    feats.append(h)
    fns: dict[str, Callable[[], object]] = {"static": functools.partial(model.forward_static, x)}
    for i, (stage, head) in enumerate(zip(model.stages, model.heads)):
        fns[f"stage{i}"] = functools.partial(stage, feats[i])
        fns[f"head{i}"] = functools.partial(head, feats[i + 1])
    if estimator is not None:
        fns["paper"] = functools.partial(estimator.paper, x, check=False)
        if estimator.coef.numel():  # the learned score reads exit 1's output too
            fns["learned"] = functools.partial(estimator, x, feats[1], model.heads[0](feats[1]), check=False)
    seconds = alternate(fns, repeats, len(x), lambda: _sync(x.device), warmup=2)[0]
    t = {k: 1e3 * statistics.median(v) for k, v in seconds.items()}
    n = model.num_exits
    return {"batch_size": len(x), "stage_ms": [t[f"stage{i}"] for i in range(n)],
            "head_ms": [t[f"head{i}"] for i in range(n)], "static_ms": t["static"],
            "estimator_ms": {k: t[k] for k in ("paper", "learned") if k in t}}


def stage_time_speedup(costs: dict, policy: ExitPolicy, exits: np.ndarray) -> float:
    """The speedup over the plain network that ``stage_costs`` predict for ``policy`` leaving at ``exits``: the MAC
    prediction with measured times in place of MACs (so it counts what MACs miss, such as memory-bound layers)."""
    per_exit = policy.leave_costs(np.cumsum(np.add(costs["stage_ms"], costs["head_ms"])), costs["static_ms"],
                           costs["estimator_ms"])
    return costs["static_ms"] / float(per_exit[np.asarray(exits)].mean())


def stage_times(model_name: str = "alexnet", dataset: str = "cifar10", batch_sizes: tuple[int, ...] = (256, 1),
                repeats: int = 10, threads: int | None = None) -> dict:
    """Median time of each stage and each exit head of the inference-optimised model, against its MACs."""
    n_threads = set_threads(threads)
    spec = get_spec(dataset)
    model = optimize_for_inference(create_model(model_name, spec.num_classes, spec.in_channels, spec.image_size))
    cost = model.cost_breakdown()
    total_macs = sum(cost["stage_macs"])
    out: dict[str, Any] = {"model": model_name, "dataset": dataset, "threads": n_threads, "rows": {}}
    for bs in batch_sizes:
        c = stage_costs(model, torch.rand(bs, spec.in_channels, spec.image_size, spec.image_size),
                        repeats=repeats if bs > 1 else 10 * repeats)
        static = sum(c["stage_ms"])
        out["rows"][bs] = [{"exit": i + 1, "stage_ms": bs * c["stage_ms"][i], "head_ms": bs * c["head_ms"][i],
                            "stage_time_share": c["stage_ms"][i] / static,
                            "stage_mac_share": cost["stage_macs"][i] / total_macs} for i in range(model.num_exits)]
    return out


def controller_overhead(run_dir: str | Path, policy_path: str | Path, batch_size: int = 256, n_images: int = 2560,
                        repeats: int = 5, threads: int | None = None, data_dir: str | Path | None = None) -> dict:
    """Wall-clock cost of the adaptive controller over the runner alone, on a stationary stream, audits off."""
    run_dir = Path(run_dir)
    n_threads = set_threads(threads)
    run = Run(run_dir)
    model, est, test = run.model(), run.estimators(), run.test_images(data_dir)
    # a stationary stream is a random draw: the test files are often sorted by class, and a run of one
    # class is a class-prior shift (which the shift guard may rightly react to)
    pick = timing_sample(len(test.x), n_images)
    x = to_float(torch.from_numpy(test.x[pick]))
    batches = [x[s: s + batch_size] for s in range(0, len(x), batch_size)]
    runner = EarlyExitRunner(model, load_policy(policy_path), est)
    settings = load_settings(run_dir)[0].model_copy(update={"audit_share": 0.0})  # the run's guard, as deployed
    ctrl = controller_for_run(run_dir, policy_path, settings)

    def run_plain() -> None:
        for b in batches:
            runner(b)

    def run_ctrl() -> None:
        for b in batches:
            ctrl.process(b)

    t, _ = alternate({"runner": run_plain, "controller": run_ctrl}, repeats)
    r, c = statistics.median(t["runner"]), statistics.median(t["controller"])
    return {"threads": n_threads, "batch_size": batch_size, "images": len(x), "repeats": repeats,
            "runner_ms_per_image": 1e3 * r / len(x), "controller_ms_per_image": 1e3 * c / len(x),
            "overhead": c / r - 1, "updates": len(ctrl.history), "shift_guard": ctrl.alpha_ref is not None,
            "guard_fired": ctrl.shifted or any(h["shifted"] for h in ctrl.history)}
