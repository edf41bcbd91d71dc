"""Tracing a trained run: the step between the multi-exit model and the policies.

``trace_run`` fits the difficulty estimators, runs every exit over the calibration and test splits
and writes the two trace files (the format lives in ``dart_ee.trace``); ``is_current`` says whether a
run's traces were made from its present model, data and difficulty settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from dart_ee.config import config_fingerprint, step_fingerprint
from dart_ee.core import artifacts
from dart_ee.core.errors import InputError
from dart_ee.core.lock import holds_run_lock
from dart_ee.core.runfiles import ESTIMATORS, MODEL, trace_file
from dart_ee.data.datasets import to_float
from dart_ee.difficulty import estimators as difficulty_mod
from dart_ee.difficulty.estimators import oracle_depth
from dart_ee.models.custom import IMAGES, save_images
from dart_ee.runs.run import Run
from dart_ee.trace import Trace, save
from dart_ee.training.train import decode_workers, predict_exits, prepare_splits

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from dart_ee.config import Config
    from dart_ee.difficulty.estimators import LearnedDifficulty
    from dart_ee.models.net import MultiExitNet
    from dart_ee.training.train import Splits


def inputs_fingerprint(cfg: Config, run_dir: Path) -> str:
    """What a run's traces are made from: the model's weights, the data split and the difficulty settings."""
    return step_fingerprint(cfg, "trace", model=artifacts.file_fingerprint(Path(run_dir) / MODEL))


def is_current(trace: Trace, cfg: Config, run_dir: Path) -> bool:
    """Was ``trace`` made from the run's present model and ``cfg``'s trace inputs?"""
    if "inputs_fingerprint" in trace.meta:
        return trace.meta["inputs_fingerprint"] == inputs_fingerprint(cfg, run_dir)
    # made before inputs_fingerprint existed: a new model or split retires them, so only the score can differ
    return trace.meta.get("difficulty") == cfg.difficulty


@holds_run_lock("run_dir")
def trace_run(run_dir: str | Path, data_dir: str | Path | None = None) -> dict[str, Path]:
    """Trace a trained run over its calibration and test splits: writes ``trace_cal`` and ``trace_test``.

    On the way it fits the difficulty estimators (the paper's on training images, the learned one
    by cross-validation on the calibration split), saves them to ``RUN/difficulty.pt`` and stores
    every sample's alpha in the traces.
    """
    run_dir = Path(run_dir)
    run = Run(run_dir)
    cfg, model = run.config(), run.model()
    splits = prepare_splits(cfg, run_dir, data_dir)
    est = difficulty_mod.fit_estimators(_fit_images(splits, cfg), seed=cfg.seed)
    workers = decode_workers(cfg)

    results: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for split, images in (("cal", splits.cal), ("test", splits.test)):  # the calibration split first
        feats: list[np.ndarray] = []
        terms: list[np.ndarray] = []
        probs = predict_exits(model, images.x, cfg.train.eval_batch_size, stage1_hook=_collector(est, terms, feats),
                              workers=workers)
        feats_a = np.concatenate(feats)
        learned = _learned_alpha(est, split, probs, images.y, feats_a, model.num_exits, cfg.seed)
        results[split] = (probs, np.concatenate(terms), learned)
    difficulty_mod.save_estimators(est, run_dir / ESTIMATORS)

    est_macs = est.macs(model)
    selected = f"alpha_{cfg.difficulty}"
    exit_macs = np.asarray(model.exit_macs()) + est_macs[cfg.difficulty]
    base = {"model": model.arch, "dataset": cfg.data.dataset, "config_name": cfg.name,
            "config_fingerprint": config_fingerprint(cfg), "run": str(run_dir),
            "inputs_fingerprint": inputs_fingerprint(cfg, run_dir),
            "static_macs": model.static_macs(), "difficulty": cfg.difficulty, "estimator_macs": est_macs,
            "exit_macs_include": "stages, exit heads passed, and the configured difficulty estimator"}
    out = {}
    for split, images, index in (("cal", splits.cal, splits.manifest["cal_indices"]),
                                 ("test", splits.test, np.arange(len(splits.test)))):
        probs, split_terms, learned = results[split]
        extra: dict[str, np.ndarray] = {"alpha_paper": est.paper.fuse(torch.from_numpy(split_terms)).numpy(),
                                        "alpha_learned": learned, "terms": split_terms}
        t = Trace(probs, images.y, np.asarray(index), exit_macs, extra[selected], {**base, "split": split}, extra)
        out[split] = save(t, run_dir / trace_file(split))
    return out


FIT_IMAGES = 20_000  # a streamed training set fits the paper's estimator on a seeded draw of this many


def _fit_images(splits: Splits, cfg: Config) -> np.ndarray:
    """The images the paper's estimator is fitted on: the training split, or a draw from a streamed one
    (its quantiles need thousands of images, not millions; the fit decodes 2,000 at a time)."""
    x = splits.train.x
    if not cfg.data.stream or len(x) <= FIT_IMAGES:
        return x
    pick = np.sort(np.random.default_rng(cfg.seed).choice(len(x), FIT_IMAGES, replace=False))
    return splits.train.subset(pick).x


def _collector(est: LearnedDifficulty, terms: list, feats: list | None) -> Callable:
    """A ``predict_exits`` hook keeping each batch's paper terms (and, with ``feats``, the learned estimator's
    features: they read stage 1 and exit 1, which the hook sees)."""
    def collect(x: torch.Tensor, h1: torch.Tensor, logits1: torch.Tensor) -> None:
        t = est.paper.terms(x.to(next(est.buffers()).device)).cpu()
        terms.append(t.numpy())
        if feats is not None:
            feats.append(est.features(t, h1.cpu(), logits1.cpu()).numpy())
    return collect


def _learned_alpha(est: LearnedDifficulty, split: str, probs: np.ndarray, labels: np.ndarray, feats: np.ndarray,
                   num_exits: int, seed: int) -> np.ndarray:
    """The learned alpha: fitted on the calibration split (its out-of-fold values), predicted on the test split."""
    if split == "cal":
        return est.fit(feats, oracle_depth(probs.argmax(2) == labels[:, None]), num_exits, seed=seed)
    if est.coef.numel() != feats.shape[1]:
        raise InputError("the learned difficulty is fitted on the calibration split: trace the 'cal' split first")
    with torch.no_grad():
        return est.predict(torch.from_numpy(feats)).numpy()


@torch.no_grad()
def make_trace(model: MultiExitNet, batches: Iterable, split: str, estimator: LearnedDifficulty | None = None,
               run_dir: str | Path | None = None, **meta: object) -> Trace:
    """A trace of any model from any iterable of ``(images, labels)`` batches (a ``DataLoader``, say).

    Images are uint8 or float pixels in [0, 1], (N, C, H, W). With a fitted ``estimator`` (whose paper
    score is fitted: ``difficulty.fit_estimators(train_images)``) the trace carries the paper's alpha,
    and its exit costs include it, as ``trace_run``'s do. ``split`` is "cal" or "test": calibration
    refuses a test trace. ``meta`` is recorded as is (a dataset name, say).

    With ``run_dir`` (a run written by ``fit_exits(..., run_dir=...)``) the trace, the estimators and
    the images are saved there, so that every command reads the run (``dart_ee.models.custom``). As in
    ``trace_run``, the learned difficulty is fitted on the calibration split (trace it first).
    """
    if split not in ("cal", "test"):
        raise InputError(f"make_trace: split must be 'cal' or 'test', got {split!r}")
    if run_dir is not None and estimator is None:
        raise InputError("make_trace(run_dir=...) needs the fitted estimator: commands read every sample's alpha "
                         "(estimator = dart_ee.difficulty.estimators.fit_estimators(train_images))")
    probs, labels, images = [], [], []
    terms: list[np.ndarray] = []
    feats: list[np.ndarray] = []
    # the learned score too, once it is fitted (on a run's calibration split), for the test split or a stream
    learned = estimator is not None and run_dir is None and split == "test" and estimator.coef.numel() > 0
    hook = _collector(estimator, terms, feats if run_dir is not None or learned else None) if estimator is not None else None
    for batch, y in batches:
        batch = torch.as_tensor(batch)
        x = to_float(batch)
        probs.append(predict_exits(model, x, max(len(x), 1), stage1_hook=hook))
        labels.append(torch.as_tensor(y).cpu().numpy())
        if run_dir is not None:
            images.append(batch.cpu().numpy())
    if not probs:
        raise InputError("make_trace: the batches are empty; pass at least one (images, labels) batch")
    p, y_all = np.concatenate(probs), np.concatenate(labels)
    extra: dict[str, np.ndarray] = {}
    if estimator is not None:
        extra["terms"] = np.concatenate(terms)
        extra["alpha_paper"] = estimator.paper.fuse(torch.from_numpy(extra["terms"])).numpy()
    if learned:
        assert estimator is not None
        extra["alpha_learned"] = _learned_alpha(estimator, split, p, y_all, np.concatenate(feats), model.num_exits, 0)
    est_macs = estimator.macs(model) if estimator is not None else {}
    meta = {**meta, "split": split, "model": model.arch, "static_macs": model.static_macs(),
            "difficulty": "paper" if extra else None, "estimator_macs": est_macs}
    if run_dir is None:
        return Trace(p, y_all, np.arange(len(p)), np.asarray(model.exit_macs()) + est_macs.get("paper", 0),
                     extra.get("alpha_paper"), meta, extra)
    assert estimator is not None
    return _save_custom_trace(Path(run_dir), model, estimator, p, y_all, images, np.concatenate(feats), extra, meta)


@holds_run_lock("run_dir")
def _save_custom_trace(run_dir: Path, model: MultiExitNet, est: LearnedDifficulty, probs: np.ndarray, y: np.ndarray,
                       images: list[np.ndarray], feats: np.ndarray, extra: dict[str, np.ndarray], meta: dict) -> Trace:
    """``make_trace(run_dir=...)``: the trace, the estimators and the images of a run written from Python."""
    if not (run_dir / MODEL).is_file():
        raise InputError(f"make_trace: {run_dir} holds no model; write the run first with "
                         "fit_exits(model, ..., run_dir=...), then trace that model into it")
    cfg = Run(run_dir).config()
    saved = artifacts.load_torch(run_dir / MODEL, "model file")["state_dict"]
    mine = model.state_dict()
    if saved.keys() != mine.keys() or any(not torch.equal(saved[k], mine[k].cpu()) for k in saved):
        raise InputError(f"make_trace: this model is not the one saved in {run_dir / MODEL}; trace the model "
                         "fit_exits(..., run_dir=...) trained, or train it into this folder first")
    split = meta["split"]
    extra["alpha_learned"] = _learned_alpha(est, split, probs, y, feats, model.num_exits, cfg.seed)
    difficulty_mod.save_estimators(est, run_dir / ESTIMATORS)
    save_images(run_dir / IMAGES.format(split=split), images, y)
    meta.update(dataset=cfg.data.dataset, config_name=cfg.name, config_fingerprint=config_fingerprint(cfg),
                run=str(run_dir), inputs_fingerprint=inputs_fingerprint(cfg, run_dir), difficulty=cfg.difficulty,
                exit_macs_include="stages, exit heads passed, and the configured difficulty estimator")
    exit_macs = np.asarray(model.exit_macs()) + meta["estimator_macs"][cfg.difficulty]
    t = Trace(probs, y, np.arange(len(probs)), exit_macs, extra[f"alpha_{cfg.difficulty}"], meta, extra)
    save(t, run_dir / trace_file(split))
    return t
