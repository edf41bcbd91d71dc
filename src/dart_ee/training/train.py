"""Joint training of every exit (METHOD.md section 1), with exact resume after a kill.

Loss (Eq 18): L = sum_i w_i * CE(y, yhat_i) + lambda * L_policy, with w_i = i/N by default.
Optional self-distillation replaces a share ``distill`` of each early exit's CE by a KL term towards
the (detached) final exit, which lifts the early exits that every policy exploits.

Determinism: the data order, the augmentation and dropout of epoch e all derive from
(seed, e), and a checkpoint is written atomically after every epoch. A run killed at any point and
resumed from its last checkpoint therefore reaches the same final weights as an uninterrupted run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dart_ee.config import (
    Config,
    DataConfig,
    ModelConfig,
    TrainConfig,
    check_exit_lists,
    config_fingerprint,
    dump_config,
    load_config,
    step_fingerprint,
)
from dart_ee.core import artifacts
from dart_ee.core.console import log, progress
from dart_ee.core.errors import ArtifactError, ConfigError, DataError, UntrustedCodeError
from dart_ee.core.lock import holds_run_lock, run_lock
from dart_ee.core.provenance import hardware_info
from dart_ee.core.runfiles import CHECKPOINT, CONFIG, METRICS, MODEL, SPLIT
from dart_ee.core.threads import set_threads
from dart_ee.data import datasets as data
from dart_ee.data import streaming
from dart_ee.models.custom import CUSTOM, check_rebuilds, rebuild
from dart_ee.models.net import MultiExitNet, create_model, optimize_for_inference
from dart_ee.training import distributed


@dataclass
class Splits:
    """The three disjoint splits a run uses; ``cal`` is held out from the training set."""

    train: data.ImageSet
    cal: data.ImageSet
    test: data.ImageSet
    spec: data.DatasetSpec
    manifest: dict


def prepare_splits(cfg: Config, run_dir: Path, data_dir: str | Path | None = None) -> Splits:
    """Load the dataset and the run's calibration split (created once, then read from ``split.json``)."""
    d = cfg.data
    spec = data.get_spec(d.dataset)
    path = run_dir / SPLIT
    manifest = artifacts.read_json(path, "split manifest") if path.is_file() else None
    # the run remembers where its data was, so later steps need no --data-dir
    data_dir = data_dir or cfg.data.data_dir or os.environ.get("DART_DATA") or (manifest or {}).get("data_dir")
    root = None if not spec.folders else data.resolve_data_dir(data_dir)  # packaged data needs no folder
    train, test = data.load_dataset(d.dataset, root, size=d.image_size, stream=d.stream)
    spec = data.dataset_spec(d.dataset, d.image_size, len(train.classes))
    # Subsets are seeded random draws: the files are often sorted by class.
    if cfg.data.train_subset:
        train = train.subset(_draw(len(train), cfg.data.train_subset, cfg.data.split_seed))
    if cfg.data.test_subset:
        test = test.subset(_draw(len(test), cfg.data.test_subset, cfg.data.split_seed))
    if manifest is not None:
        data.check_split(manifest, len(train))
        # runs split before the fingerprint was recorded are not checked (and their data is not hashed)
        # a streamed split hashes file names and times, an in-memory one pixels: compared within one mode
        same_mode = manifest.get("streamed", False) == d.stream
        if "data_fingerprint" in manifest and same_mode and manifest["data_fingerprint"] != data.content_fingerprint(
                train, test):
            raise DataError(f"{run_dir} was made from other data than {root or cfg.data.dataset} holds (the pixels or "
                            f"labels differ from those recorded in {path}); point --data-dir at the run's own data, "
                            f"{manifest.get('data_dir')}, or start a new --out")
    else:
        manifest = data.make_split(len(train), cfg.data.cal_fraction, cfg.data.split_seed)
        manifest.update(dataset=cfg.data.dataset, data_dir=str(root.resolve()) if root else None,
                        data_fingerprint=data.content_fingerprint(train, test), streamed=d.stream)
        artifacts.write_json(path, manifest)
    return Splits(train.subset(np.asarray(manifest["train_indices"])), train.subset(np.asarray(manifest["cal_indices"])),
                  test, spec, manifest)


def _draw(n: int, k: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).permutation(n)[: min(k, n)])


def build_model(cfg: Config, spec: data.DatasetSpec) -> MultiExitNet:
    model = create_model(cfg.model.name, spec.num_classes, spec.in_channels, spec.image_size,
                         head_width=cfg.model.head_width, width_mult=cfg.model.width_mult,
                         mean=spec.mean, std=spec.std)
    check_exit_lists(cfg, model.num_exits)
    return model


def single_exit_config(cfg: Config, num_exits: int) -> Config:
    """The same recipe and budget with every loss weight on the final exit: the cost-of-joint-training baseline."""
    solo = cfg.model_copy(deep=True)
    solo.name = f"{cfg.name}_single_exit"
    solo.train.exit_weights, solo.train.distill, solo.train.policy_lambda = [0.0] * (num_exits - 1) + [1.0], 0.0, 0.0
    return solo


def exit_weights(cfg: Config, num_exits: int) -> list[float]:
    return cfg.train.exit_weights or [(i + 1) / num_exits for i in range(num_exits)]


def multi_exit_loss(logits: list[torch.Tensor], y: torch.Tensor, weights: list[float], cfg: Config,
                    cost_frac: list[float]) -> torch.Tensor:
    """Eq 18 with optional self-distillation and the L_policy regulariser of METHOD.md section 1."""
    t = cfg.train
    final = logits[-1].float()
    soft_target = F.softmax(final.detach() / t.distill_temperature, dim=1)
    loss = final.new_zeros(())
    for i, z in enumerate(logits):
        z = z.float()
        term = F.cross_entropy(z, y, label_smoothing=t.label_smoothing)
        if t.distill > 0 and i < len(logits) - 1:
            kd = F.kl_div(F.log_softmax(z / t.distill_temperature, 1), soft_target, reduction="batchmean")
            term = (1 - t.distill) * term + t.distill * kd * t.distill_temperature ** 2
        loss = loss + weights[i] * term
    if t.policy_lambda > 0:
        # L_policy: reward confident early exits, weighted by the compute they would save.
        conf = [F.softmax(z.float(), 1).amax(1).mean() for z in logits[:-1]]
        loss = loss + t.policy_lambda * torch.stack([(1 - c_f) * (1 - c) for c, c_f in zip(conf, cost_frac)]).mean()
    return loss


def decode_workers(cfg: Config) -> int:
    """Processes that decode streamed images: ``data.workers``, else the cores (at most 4); 0 in memory."""
    if not cfg.data.stream:
        return 0
    return cfg.data.workers if cfg.data.workers is not None else min(4, os.cpu_count() or 1)


@torch.inference_mode()
def predict_exits(model: MultiExitNet, images: np.ndarray | torch.Tensor | streaming.FileImages, batch_size: int = 500,
                  stage1_hook: Callable | None = None, workers: int = 0) -> np.ndarray:
    """Softmax probabilities of every exit, shape (N, exits, classes), computed in fp32.

    ``stage1_hook(x, stage1_features, exit1_logits)`` sees each batch's first stage (the learned
    difficulty estimator reads it). Streamed images are decoded by ``workers`` processes.
    """
    model.eval()
    dev = next(model.parameters()).device
    out = []
    for xb in streaming.batches(images, streaming.in_order(len(images), batch_size), workers):
        x = data.to_float(xb.to(dev))
        h, logits = x, []
        for i, (stage, head) in enumerate(zip(model.stages, model.heads)):
            h = stage(h)
            logits.append(head(h))
            if i == 0 and stage1_hook is not None:
                stage1_hook(x, h, logits[0])
        out.append(torch.stack([F.softmax(z.float(), 1) for z in logits], 1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.num_exits, 0), np.float32)


def exit_accuracies(probs: np.ndarray, labels: np.ndarray) -> list[float]:
    return [float(a) for a in (probs.argmax(2) == labels[:, None]).mean(0)]


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


def training_device(name: str) -> torch.device:
    """``auto`` picks the GPU when torch sees one; ``cuda`` without one is a config error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but torch sees no GPU; set train.device: cpu (or auto)")
    return torch.device(name)


def use_bf16(requested: bool, dev: torch.device) -> bool:
    """Whether bf16 autocast runs: as requested, except on a CPU without native bf16 arithmetic (no AMX, no
    AVX512-BF16), where it is emulated and was measured 18x slower than fp32 for a CIFAR-10 AlexNet step
    (AMD EPYC, AVX2). There it falls back to fp32 and says so, rather than silently training for hours."""
    if not requested or dev.type != "cpu":
        return requested
    native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    if not native:
        log("train.bf16 ignored: this CPU has no native bf16 (no AMX or AVX512-BF16), where autocast is emulated and "
            "many times slower; training in fp32")
    return native


def make_optimizer(params: Iterable, t: TrainConfig) -> torch.optim.Optimizer:
    """The recipe's optimiser: SGD with Nesterov momentum, or AdamW (``train.optimizer``)."""
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov and t.momentum > 0,
                           weight_decay=t.weight_decay)


def one_cycle(opt: torch.optim.Optimizer, lr: float, total_steps: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """The recipe's schedule: a quarter of the steps warm up linearly to ``lr``, the rest anneal.

    OneCycleLR divides by the warm-up steps minus one, so a run of exactly 4 steps (a warm-up of 1)
    warms up for 2.
    """
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps,
                                               pct_start=0.5 if total_steps == 4 else 0.25,
                                               anneal_strategy="linear", div_factor=10, final_div_factor=100)


def set_run_threads(cfg: Config, world_size: int = 1) -> int:
    """The run's intra-op threads: ``train.num_threads``, else the cores shared among the processes.

    Every step of a run takes this number, whether or not training ran in the same process, so that
    a resumed run computes what an uninterrupted one does.
    """
    return set_threads(cfg.train.num_threads or max(1, (os.cpu_count() or 1) // world_size))


@dataclass
class _Job:
    """One training run's state, shared by its steps (set up, each epoch, evaluation)."""

    cfg: Config
    run_dir: Path
    dev: torch.device
    world: Any  # distributed.World: this process's rank and the processes' count
    threads: int
    splits: Splits
    model: MultiExitNet
    trainee: torch.nn.Module  # what the steps call: the model, or DDP over it
    opt: torch.optim.Optimizer
    sched: Any
    steps: int  # per epoch
    fingerprints: tuple[str, str]  # the whole config's, the training inputs'
    bf16: bool  # autocast, where it runs natively (use_bf16)
    y_train: torch.Tensor  # the training labels, on the training device once for every epoch
    start_epoch: int = 0
    wall: float = 0.0


@holds_run_lock("run_dir")
def train(cfg: Config, run_dir: str | Path, data_dir: str | Path | None = None, resume: bool = False) -> dict:
    """Train a multi-exit model into ``run_dir`` and return its metrics (see ``metrics.json``)."""
    run_dir = Path(run_dir)
    finished, ck = _resume_point(cfg, run_dir, resume)
    if finished is not None:
        return finished
    job = _start(cfg, run_dir, data_dir, ck)
    t = cfg.train
    workers = decode_workers(cfg)
    log(f"training {cfg.model.name} on {cfg.data.dataset}: {len(job.splits.train)} train / {len(job.splits.cal)} cal / "
        f"{len(job.splits.test)} test images, {job.model.num_exits} exits, {t.epochs} epochs, device {job.dev}, "
        f"{job.threads} threads, bf16={job.bf16}, channels_last={t.channels_last}"
        + (f", {job.world.size} processes" if job.world.size > 1 else ""))
    # In memory, the uint8 training set lives on the training device (138 MB for CIFAR-10), so a GPU step
    # never waits for a host copy. Streamed, worker processes decode each batch ahead of its step. Either
    # way batches are cast and augmented on the device, so both paths train on the same pixels.
    x_train = None if cfg.data.stream else torch.from_numpy(job.splits.train.x).to(job.dev)
    with progress() as bar:
        task = bar.add_task("train", total=(t.epochs - job.start_epoch) * job.steps)
        for epoch in range(job.start_epoch, t.epochs):
            t0 = time.perf_counter()
            loss, accs = _epoch(job, epoch, x_train, workers, lambda **kw: bar.update(task, **kw))
            job.wall += time.perf_counter() - t0
            if job.world.main:
                artifacts.save_torch(run_dir / CHECKPOINT, {
                    "epoch": epoch + 1, "model": job.model.state_dict(), "optimizer": job.opt.state_dict(),
                    "scheduler": job.sched.state_dict(), "config_fingerprint": job.fingerprints[0],
                    "train_fingerprint": job.fingerprints[1], "wall_time_s": job.wall})
            log(f"epoch {epoch + 1}/{t.epochs}: loss {loss:.4f}, train exit acc% "
                f"{' '.join(f'{100 * a:.1f}' for a in accs)}, {time.perf_counter() - t0:.0f}s")
    distributed.barrier()
    if not job.world.main:  # rank 0 evaluates and writes the model; the others wait for its metrics
        distributed.barrier()
        return artifacts.read_json(run_dir / METRICS, "metrics")
    metrics = _evaluate_and_save(job, workers)
    distributed.barrier()
    return metrics


def _resume_point(cfg: Config, run_dir: Path, resume: bool) -> tuple[dict | None, dict | None]:
    """The metrics of a finished run being resumed (nothing to do), else the checkpoint to resume (or None)."""
    ckpt_path = run_dir / CHECKPOINT
    if (run_dir / MODEL).is_file() and (run_dir / METRICS).is_file() and resume:
        metrics = artifacts.read_json(run_dir / METRICS, "metrics")
        if not is_current(metrics, cfg, run_dir):
            raise ConfigError(f"{run_dir} holds a model trained with other settings; resume with the run's own "
                              f"{run_dir / CONFIG}, or choose another --out (`dart-ee run` moves it aside)")
        log(f"{run_dir}: training already finished; nothing to resume")
        return metrics, None
    if ckpt_path.is_file() and not resume:
        raise ConfigError(f"{run_dir} already holds a training checkpoint; pass --resume to continue it, "
                          "or choose another --out")
    ck = artifacts.load_torch(ckpt_path, "training checkpoint") if resume and ckpt_path.is_file() else None
    # checked before config.yaml is rewritten; checkpoints older than train_fingerprint match the whole config
    if (ck is not None and ck.get("train_fingerprint", "") != step_fingerprint(cfg, "train")
            and ck.get("config_fingerprint") != config_fingerprint(cfg)):
        raise ConfigError(f"{ckpt_path} was written by a different config; resume with the run's own "
                          f"{run_dir / CONFIG} or start a new --out")
    return None, ck


def _start(cfg: Config, run_dir: Path, data_dir: str | Path | None, ck: dict | None) -> _Job:
    """Processes, threads, splits, the model on its device, the optimiser and schedule (restored from ``ck``)."""
    dev = training_device(cfg.train.device)
    w = distributed.start(dev.type)
    if w.size > 1 and dev.type == "cuda":
        dev = torch.device("cuda", w.local_rank)
    threads = set_run_threads(cfg, w.size)
    if w.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        artifacts.write_text(run_dir / CONFIG, dump_config(cfg))
        splits = prepare_splits(cfg, run_dir, data_dir)  # writes split.json and the decode cache once
    distributed.barrier()
    if not w.main:
        splits = prepare_splits(cfg, run_dir, data_dir)
    torch.manual_seed(cfg.seed)
    t = cfg.train
    mem = torch.channels_last if t.channels_last else torch.contiguous_format
    model = build_model(cfg, splits.spec).to(dev, memory_format=mem)  # type: ignore[call-overload]  # stubs lack it
    # what the steps call: DDP over the network when several processes train (its BatchNorm layers are
    # replaced in place by synchronised ones, so this comes before the optimiser takes the parameters)
    trainee = distributed.wrap(model, w, dev)
    opt = make_optimizer(model.parameters(), t)
    steps = min(len(splits.train) // t.batch_size, t.max_steps or len(splits.train))
    if steps == 0:
        raise ConfigError(f"train.batch_size={t.batch_size} exceeds the {len(splits.train)} training images")
    sched = one_cycle(opt, t.lr, t.epochs * steps)
    job = _Job(cfg, run_dir, dev, w, threads, splits, model, trainee, opt, sched, steps,
               (config_fingerprint(cfg), step_fingerprint(cfg, "train")), use_bf16(t.bf16, dev),
               torch.from_numpy(splits.train.y).to(dev))
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        job.start_epoch, job.wall = ck["epoch"], ck["wall_time_s"]
        log(f"resuming {run_dir} after epoch {job.start_epoch}/{t.epochs}")
    return job


def _epoch(job: _Job, epoch: int, x_train: torch.Tensor | None, workers: int,
           show: Callable[..., None]) -> tuple[float, list[float]]:
    """One epoch of joint training: its loss and each exit's training accuracy over every process's samples."""
    cfg, t, dev, model = job.cfg, job.cfg.train, job.dev, job.model
    n_exits, macs = model.num_exits, model.exit_macs()
    cost_frac, weights = [m / macs[-1] for m in macs], exit_weights(cfg, model.num_exits)
    mem = torch.channels_last if t.channels_last else torch.contiguous_format
    crop_pad = job.splits.spec.crop_pad if t.crop_pad is None else t.crop_pad
    flip = job.splits.spec.flip if t.flip is None else t.flip
    share = distributed.local_share(t.batch_size, job.world)  # all of it in one process
    y_train = job.y_train
    gen = torch.Generator(dev).manual_seed(_epoch_seed(cfg.seed, epoch))
    torch.manual_seed(_epoch_seed(cfg.seed, epoch))  # dropout
    perm = torch.randperm(len(y_train), generator=gen, device=dev)
    # every process draws the same global batches and takes its share of each: only that is decoded
    order = [perm[b * t.batch_size: (b + 1) * t.batch_size][share] for b in range(job.steps)]
    pixels = (streaming.batches(job.splits.train.x, [o.cpu().numpy() for o in order], workers, dev.type == "cuda")
              if x_train is None else (x_train[o] for o in order))
    job.trainee.train()
    # running sums stay on the device: reading them every step would stall a GPU
    loss_sum, correct, seen = torch.zeros((), device=dev), torch.zeros(n_exits, device=dev), 0
    first_bad = torch.full((), -1, device=dev)  # first step with a non-finite loss, read with the sums
    for b, (idx, xb) in enumerate(zip(order, pixels)):
        # augmented with draws for the whole global batch (same generator in every process)
        x = data.augment(data.to_float(xb.to(dev, non_blocking=True)), crop_pad, flip, gen, t.batch_size, share)
        x = x.to(memory_format=mem)
        y = y_train[idx]
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=job.bf16):
            logits = job.trainee(x)
        loss = multi_exit_loss(logits, y, weights, cfg, cost_frac)
        job.opt.zero_grad(set_to_none=True)
        loss.backward()
        job.opt.step()
        job.sched.step()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), b, first_bad)
        loss_sum += loss.detach() * len(y)
        correct += torch.stack([(z.argmax(1) == y).sum() for z in logits]).detach().float()
        seen += len(y)
        if b % 20 == 19 or b == job.steps - 1:
            accs = " ".join(f"{100 * c / seen:.0f}" for c in correct.tolist())
            show(description=f"epoch {epoch + 1}/{t.epochs} loss {float(loss_sum) / seen:.3f} exit acc% {accs}")
        show(advance=1)
    seen_all = float(distributed.all_sum(torch.tensor(float(seen), device=dev)))
    epoch_loss = float(distributed.all_sum(loss_sum)) / seen_all
    correct = distributed.all_sum(correct)
    if float(distributed.all_sum((first_bad >= 0).float())):  # before the checkpoint: no NaN model is written
        where = f", step {int(first_bad) + 1} of {job.steps}" if int(first_bad) >= 0 else " (in another process)"
        raise ConfigError(f"training diverged: non-finite loss at epoch {epoch + 1}{where}; lower train.lr "
                          f"(now {t.lr}) or check the data and the loss weights")
    return epoch_loss, [c / seen_all for c in correct.tolist()]


def _evaluate_and_save(job: _Job, workers: int) -> dict:
    """Each exit's test and calibration accuracy (fp32, on the training device); write model.pt and metrics.json."""
    cfg, t, splits = job.cfg, job.cfg.train, job.splits
    model = job.model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]  # stubs lack it
    macs = model.exit_macs()
    t0 = time.perf_counter()
    test_acc = exit_accuracies(predict_exits(model, splits.test.x, t.eval_batch_size, workers=workers), splits.test.y)
    cal_acc = exit_accuracies(predict_exits(model, splits.cal.x, t.eval_batch_size, workers=workers), splits.cal.y)
    cost_frac = [m / macs[-1] for m in macs]
    metrics = {
        "name": cfg.name, "model": cfg.model.name, "dataset": cfg.data.dataset, "epochs": t.epochs,
        "train_wall_time_s": round(job.wall, 3), "eval_wall_time_s": round(time.perf_counter() - t0, 3),
        "threads": job.threads, "device": str(job.dev), "hardware": hardware_info(job.dev), "torch": torch.__version__,
        "exit_test_accuracy": test_acc, "exit_cal_accuracy": cal_acc,
        "exit_macs": macs, "exit_macs_fraction": cost_frac, "static_macs": model.static_macs(),
        "n_train": len(splits.train), "n_cal": len(splits.cal), "n_test": len(splits.test),
        "steps_per_epoch": job.steps, "batch_size": t.batch_size, "streamed": cfg.data.stream, "decode_workers": workers,
        "config_fingerprint": job.fingerprints[0], "train_fingerprint": job.fingerprints[1],
    }
    save_model(model.cpu(), job.run_dir / MODEL, job.fingerprints[0])
    artifacts.write_json(job.run_dir / METRICS, metrics)
    log("test accuracy per exit: " + ", ".join(
        f"exit {i + 1} {100 * a:.2f}% @ {100 * f:.1f}% MACs" for i, (a, f) in enumerate(zip(test_acc, cost_frac))))
    return metrics


def is_current(record: dict, cfg: Config, run_dir: Path) -> bool:
    """Was the run's model (``record``: its metrics or checkpoint) trained from ``cfg``'s training inputs?"""
    if "train_fingerprint" in record:
        return record["train_fingerprint"] == step_fingerprint(cfg, "train")
    # made before train_fingerprint existed: the run's config.yaml is the config that trained it

    return step_fingerprint(load_config(run_dir / CONFIG), "train") == step_fingerprint(cfg, "train")


def save_model(model: MultiExitNet, path: Path, config_fingerprint: str = "") -> None:
    artifacts.save_torch(path, {"format": "dart-ee-model", "version": 1, "arch": model.arch,
                                "state_dict": model.state_dict(), "config_fingerprint": config_fingerprint})


def load_model(path: str | Path, optimize: bool = False, trust_code: bool | None = None) -> MultiExitNet:
    """Rebuild a trained model from ``model.pt`` (weights only; no code is unpickled).

    ``optimize=True`` returns the inference-optimised copy (``models.optimize_for_inference``) that
    traces, the runtime and benchmarks share. A custom model (``dart_ee.models.custom``) is used as it was
    given: its traces were made from it unchanged, and the runtime must decide as they do. Its class is
    imported only when ``trust_code`` (default: inside ``dart_ee.trust_code()``).
    """
    path = Path(path)
    ck = artifacts.load_torch(path, "model file")
    if not isinstance(ck, dict) or ck.get("format") != "dart-ee-model" or not isinstance(ck.get("arch"), dict):
        raise ArtifactError(f"{path} is not a dart-ee model file")
    arch = dict(ck["arch"])
    custom = arch.get("name") == CUSTOM
    try:
        if custom:  # your own network, rebuilt by the class it records (dart_ee.models.custom)
            model = rebuild(arch, path.parent, trust_code)
        else:
            model = create_model(arch.pop("name", None), **arch)
    except UntrustedCodeError as e:
        raise UntrustedCodeError(f"{path}: {e}") from None
    try:
        model.load_state_dict(ck["state_dict"])
    except (RuntimeError, KeyError) as e:  # the builder makes another network than the one saved
        raise ArtifactError(f"{path}: its weights do not fit the network its record builds ({str(e).splitlines()[0]}); "
                            "restore the code the run was saved with, or train the run again") from None
    return optimize_for_inference(model) if optimize and not custom else model.eval()


def fit_exits(model: MultiExitNet, train_loader: Iterable, val_loader: Iterable | None = None,
              freeze_backbone: bool = True, checkpoint: str | Path | None = None, run_dir: str | Path | None = None,
              **train: Any) -> list[dict]:
    """Train a model's exits from your own loaders of ``(images, labels)`` batches, with ``dart-ee train``'s
    joint loss (w_i = i/N), self-distillation and bf16 autocast; returns each epoch's losses (and the
    validation accuracy per exit when ``val_loader`` is given).

    ``freeze_backbone=True`` trains the heads only: the stages' weights and BatchNorm statistics stay as
    they are (for a network you cannot retrain; its final exit is then its own classifier). ``train``
    takes ``TrainConfig`` fields (``epochs``, ``lr``, ``distill``, ``bf16``...). With ``checkpoint``, the
    state after each epoch is written there atomically and a later call resumes from it.

    With ``run_dir``, the model is saved as a run folder that every command reads (config.yaml,
    model.pt, metrics.json, under the run's lock; the checkpoint defaults to ``RUN/checkpoint.pt``):
    then ``make_trace(..., run_dir=...)`` adds its traces (see ``dart_ee.models.custom``).
    """
    cfg = Config(train=TrainConfig(**{"epochs": 5, "lr": 0.05, "distill": 0.5, **train}))
    if run_dir is None:
        return _fit_exits(model, train_loader, val_loader, freeze_backbone, checkpoint, cfg)
    run_dir = Path(run_dir)
    check_rebuilds(model)  # a run that commands could not load is refused before any training
    with run_lock(run_dir):
        t0 = time.perf_counter()
        history = _fit_exits(model, train_loader, val_loader, freeze_backbone, checkpoint or run_dir / CHECKPOINT, cfg)
        _write_custom_run(run_dir, model, cfg, history, freeze_backbone, time.perf_counter() - t0)
    return history


def _write_custom_run(run_dir: Path, model: MultiExitNet, cfg: Config, history: list[dict], frozen: bool,
                      wall: float) -> None:
    """config.yaml, model.pt and metrics.json of a model trained from Python (``fit_exits(run_dir=...)``)."""
    cfg = cfg.model_copy(update={"name": run_dir.name, "data": DataConfig(dataset=CUSTOM),
                                 "model": ModelConfig(name=CUSTOM, head_width=model.arch.get("head_width", 128))})
    fp = config_fingerprint(cfg)
    artifacts.write_text(run_dir / CONFIG, dump_config(cfg))
    save_model(model.cpu(), run_dir / MODEL, fp)
    macs = model.exit_macs()
    artifacts.write_json(run_dir / METRICS, {
        "name": cfg.name, "model": CUSTOM, "dataset": CUSTOM, "epochs": cfg.train.epochs, "arch": model.arch,
        "freeze_backbone": frozen, "train_wall_time_s": round(wall, 3), "threads": torch.get_num_threads(),
        "hardware": hardware_info(torch.device("cpu")), "torch": torch.__version__,
        "exit_val_accuracy": history[-1].get("val_exit_accuracy") if history else None, "history": history,
        "exit_macs": macs, "exit_macs_fraction": [m / macs[-1] for m in macs], "static_macs": model.static_macs(),
        "config_fingerprint": fp, "train_fingerprint": step_fingerprint(cfg, "train")})


def _restore_fit(checkpoint: str | Path | None, settings: str, shapes: dict, model: MultiExitNet,
                 opt: torch.optim.Optimizer, sched: Any) -> list[dict]:
    """Resume ``fit_exits`` from its checkpoint, if there is one: returns the finished epochs' history."""
    if checkpoint is None or not Path(checkpoint).is_file():
        return []
    ck = artifacts.load_torch(checkpoint, "fit_exits checkpoint")
    if ck.get("settings") != settings or ck.get("shapes") != shapes:
        raise ConfigError(f"{checkpoint} was written by fit_exits for another network or other settings; "
                          "delete it to start again, or pass another checkpoint / run_dir")
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    if sched is not None:
        sched.load_state_dict(ck["scheduler"])
    return list(ck["history"])


def _fit_exits(model: MultiExitNet, train_loader: Iterable, val_loader: Iterable | None, freeze_backbone: bool,
               checkpoint: str | Path | None, cfg: Config) -> list[dict]:
    t, n = cfg.train, model.num_exits
    dev = next(model.parameters()).device
    weights, cost = exit_weights(cfg, n), [m / model.exit_macs()[-1] for m in model.exit_macs()]
    for p in model.stages.parameters():
        p.requires_grad_(not freeze_backbone)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("fit_exits: nothing to train (the heads have no parameters and the backbone is frozen)")
    opt = make_optimizer(params, t)
    bf16 = use_bf16(t.bf16, dev)
    steps = len(train_loader) if isinstance(train_loader, Sized) else 0
    sched = one_cycle(opt, t.lr, t.epochs * steps) if steps else None  # a loader without a length: constant lr
    # what must match for a checkpoint to be resumed: the settings and the network (its weights' names and shapes)
    settings = step_fingerprint(cfg, "train") + str(freeze_backbone)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    history = _restore_fit(checkpoint, settings, shapes, model, opt, sched)
    for epoch in range(len(history), t.epochs):
        model.train()
        if freeze_backbone:
            model.stages.eval()  # frozen BatchNorm statistics too
        sums, count = torch.zeros(n + 1), 0
        for images, y in train_loader:
            x, y = data.to_float(torch.as_tensor(images)).to(dev), torch.as_tensor(y).to(dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16 and dev.type == "cpu"):
                logits = model(x)
            loss = multi_exit_loss(logits, y, weights, cfg, cost)
            if not torch.isfinite(loss):
                raise ConfigError(f"fit_exits: the loss is {float(loss)} in epoch {epoch + 1}: lower lr")
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            with torch.no_grad():
                per_exit = [F.cross_entropy(z.float(), y) for z in logits]
            sums += torch.tensor([float(loss.detach()), *map(float, per_exit)]) * len(y)
            count += len(y)
        rec: dict[str, Any] = {"epoch": epoch + 1, "loss": float(sums[0]) / max(count, 1),
                               "exit_loss": (sums[1:] / max(count, 1)).tolist()}
        if val_loader is not None:
            val = [(predict_exits(model, torch.as_tensor(i), len(i)), torch.as_tensor(y).numpy()) for i, y in val_loader]
            rec["val_exit_accuracy"] = exit_accuracies(np.concatenate([p for p, _ in val]),
                                                       np.concatenate([y for _, y in val]))
        history.append(rec)
        log(f"fit_exits epoch {epoch + 1}/{t.epochs}: loss {rec['loss']:.4f}"
            + (f", val exit acc% {' '.join(f'{100 * a:.1f}' for a in rec['val_exit_accuracy'])}" if val_loader else ""))
        if checkpoint is not None:
            artifacts.save_torch(checkpoint, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                              "scheduler": sched.state_dict() if sched else None, "history": history,
                                              "settings": settings, "shapes": shapes})
    model.eval()
    return history
