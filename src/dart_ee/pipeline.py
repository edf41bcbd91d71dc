"""``dart-ee run``: one config to every figure. Each step is skipped when its validated output exists,
so a killed run started again resumes where it stopped."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from dart_ee.adapt import tuning as adapt_tuning
from dart_ee.adapt.study import run_policy, study
from dart_ee.bench.benchmark import benchmark
from dart_ee.calibration.calibrate import compare, dart_ablation
from dart_ee.calibration.evaluation import simulate
from dart_ee.calibration.frontier import CERT_BUDGETS, COMPARED, certified_points, summarize_frontier, sweep
from dart_ee.config import Config, changed_fields, dump_config, load_config
from dart_ee.core import artifacts
from dart_ee.core.console import log
from dart_ee.core.errors import ArtifactError, ConfigError
from dart_ee.core.lock import holds_run_lock
from dart_ee.core.malloc import keep_freed_memory
from dart_ee.core.provenance import git_revision, hardware_info
from dart_ee.core.runfiles import (
    CHECKPOINT,
    CONFIG,
    METRICS,
    MODEL,
    POLICY_DIR,
    RESULTS,
    SINGLE_EXIT,
    SPLIT,
    STUDY,
    SUPERSEDED,
    TRACE_FILES,
)
from dart_ee.difficulty.analysis import difficulty_report
from dart_ee.policies import load_policy
from dart_ee.report import plots
from dart_ee.report.markdown import write_report
from dart_ee.runs import tracing
from dart_ee.runs.run import Run
from dart_ee.trace import Trace
from dart_ee.training import distributed
from dart_ee.training.train import is_current, set_run_threads, single_exit_config, train, training_device


def _retire(out: Path, names: tuple[str, ...], why: str) -> None:
    """Move stale artifacts aside into ``RUN/superseded/<time>/`` (nothing is deleted) and say why."""
    present = [n for n in names if (out / n).exists()]
    if not present:
        return
    dest = out / SUPERSEDED / time.strftime("%Y%m%dT%H%M%S")
    dest.mkdir(parents=True, exist_ok=True)
    for n in present:
        (out / n).rename(dest / n)
    log(f"[yellow]{out}: {why}; redoing it (the old {', '.join(present)} kept in {dest})[/yellow]")


def _retire_stale_model(cfg: Config, out: Path) -> None:
    """A model (or an unfinished checkpoint) trained from other settings goes aside, with everything made from it."""
    if (out / METRICS).is_file():
        record = artifacts.read_json(out / METRICS, "metrics")
    elif (out / CHECKPOINT).is_file():
        record = artifacts.load_torch(out / CHECKPOINT, "training checkpoint")
    else:
        return
    try:
        if is_current(record, cfg, out):
            return
    except (ArtifactError, ConfigError):
        pass  # no readable config.yaml to compare with: the model cannot be vouched for
    try:
        fields = ", ".join(changed_fields(load_config(out / CONFIG), cfg, "train")) or "fields unknown"
    except (ArtifactError, ConfigError):
        fields = "the old config.yaml is unreadable"
    _retire(out, (MODEL, METRICS, CHECKPOINT, SPLIT, CONFIG, SINGLE_EXIT) + TRACE_FILES,
            f"the model was trained with other settings ({fields})")


@holds_run_lock("out")
def run_pipeline(cfg: Config, out: Path, data_dir: str | Path | None = None) -> dict:
    """Train, trace (with difficulty), calibrate every policy, sweep, benchmark, adapt; write results.json and report.md."""

    out = Path(out)
    steps: dict[str, float] = {}
    revision = git_revision()  # the code that computes the figures, read before any of them is

    def step(name: str) -> float:
        log(f"[bold]== {name}[/bold]")
        return time.perf_counter()

    t0 = step("1/6 train")
    metrics, baseline = _train_step(cfg, out, data_dir)
    steps["train"] = time.perf_counter() - t0
    if not distributed.is_main():  # under torchrun the processes share training; rank 0 alone goes on
        return {}

    t0 = step("2/6 difficulty + trace")
    cal, test = _trace_step(cfg, out, data_dir)
    diff = difficulty_report(test)
    steps["trace"] = time.perf_counter() - t0

    cc = cfg.calibration
    how = f"--confidence {cc.confidence} --risk {cc.risk}" if cc.confidence else "(uncertified)"
    t0 = step(f"3/6 calibrate every policy at --max-drop {cc.max_drop} {how}")
    calibrated = _calibrate_step(cfg, out / POLICY_DIR, cal, test)
    steps["calibrate"] = time.perf_counter() - t0

    t0 = step("4/6 sweep (operating points chosen on calibration, measured on test)")
    sw = sweep(cal, test)
    steps["sweep"] = time.perf_counter() - t0

    exits, _ = simulate(load_policy(out / POLICY_DIR / "dart.json"), test)
    dart_diff = difficulty_report(test, exits + 1, "DART")["exit_distribution"]

    bench = None
    if cfg.benchmark.enabled:
        t0 = step("5/6 benchmark")
        bench = _benchmark_step(cfg, out, data_dir)
        steps["benchmark"] = time.perf_counter() - t0

    adaptation = None
    if cfg.adapt.enabled:
        t0 = step("6/6 adaptation (settings chosen on the calibration split, figures on the test split)")
        adaptation = adapt_run(out, cfg, data_dir)
        steps["adapt"] = time.perf_counter() - t0
    results = {"config": cfg.model_dump(mode="json"), "seed": cfg.seed, "git_revision": revision,
               "hardware": hardware_info(torch.device("cpu")), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "training": metrics,
               "single_exit_baseline": baseline, "difficulty": diff, "dart_exit_distribution": dart_diff,
               **calibrated, "sweep": sw, "benchmark": bench, "adaptation": adaptation, "step_seconds": steps}
    artifacts.write_json(out / RESULTS, results)
    render(out)
    log(f"wrote {out / 'results.json'}, {out / 'report.md'} and the figures")
    return results


def _train_step(cfg: Config, out: Path, data_dir: str | Path | None) -> tuple[dict, dict | None]:
    """The model (trained, resumed or reused when current) and the single-exit baseline's metrics."""
    world = distributed.start(training_device(cfg.train.device).type)  # under torchrun: join the other processes
    set_run_threads(cfg, world.size)  # also when training is skipped: a resumed run computes as a fresh one
    if distributed.is_main():
        _retire_stale_model(cfg, out)
        if (out / CONFIG).is_file():  # the run's config is now this one (its training fields are unchanged)
            artifacts.write_text(out / CONFIG, dump_config(cfg))
    distributed.barrier()  # (only under torchrun, once train() has joined the processes) they all see one folder
    done = (out / MODEL).is_file() and (out / METRICS).is_file()
    metrics = train(cfg, out, data_dir, resume=True) if not done else artifacts.read_json(out / METRICS, "metrics")
    if not cfg.single_exit_baseline:
        return metrics, None
    solo_dir = out / SINGLE_EXIT  # only its metrics are reported, so they are its step's output
    solo_cfg = single_exit_config(cfg, len(metrics["exit_macs"]))
    if distributed.is_main():
        _retire_stale_model(solo_cfg, solo_dir)
    distributed.barrier()
    baseline = (artifacts.read_json(solo_dir / METRICS, "metrics") if (solo_dir / METRICS).is_file() else
                train(solo_cfg, solo_dir, data_dir, resume=True))
    return metrics, baseline


def _trace_step(cfg: Config, out: Path, data_dir: str | Path | None) -> tuple[Trace, Trace]:
    """The calibration and test traces: reused when they load, with their estimators, and are current."""
    run = Run(out)
    try:  # each file read once
        cal, test = run.trace("cal"), run.trace("test")
        run.estimators()
        traced = True
    except ArtifactError:
        traced = False
    if traced and not tracing.is_current(cal, cfg, out):
        _retire(out, TRACE_FILES, "the traces were made from another model or other data or difficulty settings")
        traced = False
    if not traced:
        tracing.trace_run(out, data_dir)
        cal, test = run.trace("cal"), run.trace("test")
    return cal, test


def _calibrate_step(cfg: Config, pol_dir: Path, cal: Trace, test: Trace) -> dict:
    """Every policy calibrated at the config's budget and saved; with a confidence, the uncertified search beside
    it (labelled) and the certified frontier; the DART ablation. The results' calibration entries."""
    cc = cfg.calibration
    comp = compare(cal, test, cc.max_drop, cc.confidence, cc.risk, cfg.seed, fit_share=cc.fit_share,
                   inner_folds=cc.inner_folds)
    for name, (pol, rec) in comp.pop("fitted").items():
        pol.save(pol_dir / f"{name}.json", calibration=rec)
    uncertified = frontier = None
    if cc.confidence:
        uncertified = compare(cal, test, cc.max_drop, None)
        for name, (pol, rec) in uncertified.pop("fitted").items():
            pol.save(pol_dir / "uncertified" / f"{name}.json", calibration=rec)
        frontier = summarize_frontier(certified_points(cal, test, COMPARED, CERT_BUDGETS, cc.confidence, cc.risk,
                                                       cc.fit_share, cfg.seed), cc.confidence, cc.risk)
    ablation = dart_ablation(cal, test, cc.max_drop, cc.confidence, cfg.seed, cc.fit_share)
    return {"compare": comp, "compare_uncertified": uncertified, "certified_frontier": frontier, "ablation": ablation}


def _benchmark_step(cfg: Config, out: Path, data_dir: str | Path | None) -> dict:
    """Every calibrated policy timed against the static network (dart_ee.bench.benchmark)."""
    b = cfg.benchmark
    if b.keep_freed_memory:  # after training, whose peak memory it would raise
        keep_freed_memory()
    policies = [out / POLICY_DIR / f"{n}.json" for n in COMPARED]
    return benchmark(out, policies, b.batch_size, b.images, b.repeats, b.latency_images, b.threads, "cpu", data_dir)


def adapt_run(out: Path, cfg: Config, data_dir: str | Path | None = None) -> str:
    """Step 6: choose the controller's settings on the calibration split (unless ``adapt.tune`` is false or they
    are current), then measure adaptation on the test split; returns the study's path in the run."""
    # adaptation changes the thresholds, which voids any certificate (the report says so)
    dart_path = run_policy(out)
    a = cfg.adapt
    adapt_tuning.ensure_settings(out, dart_path, a, cfg.seed, data_dir, progress=log)
    res = study(out, dart_path, a.families, a.levels, a.clean, a.shifted, a.batch_size, cfg.seed, data_dir,
                a.mechanisms, progress=log)
    artifacts.write_json(out / STUDY, res)
    return STUDY


@holds_run_lock("out")
def render(out: Path) -> Path:
    """Draw every figure and write ``report.md`` from ``RUN/results.json`` (plus the test trace's alpha and
    ``RUN/adapt/*.json``), so a finished run can be re-rendered without recomputing (``dart-ee report``)."""
    out = Path(out)
    res = artifacts.read_json(out / RESULTS, "results")
    test = Run(out).trace("test")
    plots.alpha_histogram({k: test.extra[k] for k in ("alpha_paper", "alpha_learned")}, out / "alpha_histogram.png")
    plots.exit_distribution_plot(list(res["difficulty"]["exit_distribution"].values()), out / "exit_by_difficulty_oracle.png",
                                 "Exit distribution by difficulty (oracle exits, test split)")
    plots.exit_distribution_plot(list(res["dart_exit_distribution"].values()), out / "exit_by_difficulty_dart.png",
                                 f"Exit distribution by difficulty (DART at --max-drop "
                                 f"{res['config']['calibration']['max_drop']}, test split)")
    plots.tradeoff_curves(res["sweep"], out / "tradeoff_curves.png")
    if (out / STUDY).is_file():
        plots.study_figures(artifacts.read_json(out / STUDY, "adaptation study"), out)
    return write_report(res, out)
