"""Experiment configs: YAML files validated by pydantic, with ``--set key=value`` overrides.

Unknown keys are errors (a typo never silently falls back to a default), and every message names
the offending field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dart_ee.core.artifacts import fingerprint
from dart_ee.core.defaults import CONFIDENCE, FIT_SHARE
from dart_ee.core.errors import ConfigError


class _Strict(BaseModel):
    # inf and nan are never a sensible setting: `lr: .inf` would train a NaN model and exit 0
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(_Strict):
    # "custom": a run written from Python (dart_ee.models.custom), whose images are stored in the run folder
    # "imagefolder": any <data_dir>/train/<class>/<image> and test/ tree, at data.image_size pixels
    dataset: Literal["cifar10", "mnist", "fashion-mnist", "kmnist", "digits", "imagefolder", "custom"] = "cifar10"
    data_dir: str | None = None  # else --data-dir, else $DART_DATA
    cal_fraction: float = Field(0.1, gt=0, lt=1)  # share of the training set held out for calibration
    split_seed: int = 0
    train_subset: int | None = Field(None, ge=1)  # use only this many training images (smoke runs)
    test_subset: int | None = Field(None, ge=1)
    image_size: int | None = Field(None, ge=8, le=1024)  # resize every image to this square size (default: the data's)
    # decode ImageFolder files batch by batch in worker processes instead of holding the dataset in memory
    stream: bool = False
    workers: int | None = Field(None, ge=0, le=64)  # streaming decode processes (default: the cores, at most 4)

    @model_validator(mode="after")
    def _image_size_for_folders(self) -> DataConfig:
        if self.dataset == "imagefolder" and not self.image_size:
            raise ValueError("data.dataset 'imagefolder' needs data.image_size (e.g. 64): its images may have any size")
        return self


class ModelConfig(_Strict):
    name: str = "alexnet"
    head_width: int = Field(128, ge=1)
    width_mult: float = Field(1.0, gt=0)


class TrainConfig(_Strict):
    epochs: int = Field(30, ge=1)
    max_steps: int | None = Field(None, ge=1)  # at most this many steps an epoch (smoke runs, data benchmarks)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(0.1, gt=0)  # OneCycle peak learning rate
    # SGD with (Nesterov) momentum for the CNNs; AdamW, the usual choice for transformers trained from scratch
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    exit_weights: list[Annotated[float, Field(ge=0)]] | None = None  # one per exit; default w_i = i/N
    distill: float = Field(0.0, ge=0, le=1)  # share of self-distillation from the final exit
    distill_temperature: float = Field(3.0, gt=0)
    policy_lambda: float = Field(0.0, ge=0)  # weight of L_policy (METHOD.md section 1)
    bf16: bool = True  # bf16 autocast (its speed on this CPU: BENCHMARKS.md section 2)
    channels_last: bool = True
    crop_pad: int | None = Field(None, ge=0)  # default: the dataset's
    flip: bool | None = None  # default: the dataset's
    num_threads: int | None = Field(None, ge=1)
    eval_batch_size: int = Field(500, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: the GPU when torch sees one


class CalibrationConfig(_Strict):
    max_drop: float = Field(0.5, gt=0, lt=100)  # accuracy budget, points below the final exit
    # certify the budget with this probability (Learn-then-Test, dart_ee.calibration.certify); null: uncertified search
    confidence: float | None = Field(CONFIDENCE, ge=0.5, lt=1)
    risk: Literal["drop", "new-errors", "disagree"] = "drop"  # what the budget bounds
    fit_share: float = Field(FIT_SHARE, gt=0, lt=1)  # share of the calibration split that fits; the rest certifies
    # > 0: the learned policies' settings (DART's alpha bins, the score model's) and the test are chosen by this many
    # inner repetitions of the whole certify step on their fit split (dart_ee.calibration.inner); 0: the defaults
    inner_folds: int = Field(0, ge=0)


class BenchmarkConfig(_Strict):
    enabled: bool = True
    batch_size: int = Field(256, ge=1)
    images: int = Field(2560, ge=1)
    repeats: int = Field(5, ge=1)
    # 0: no batch-1 latency. A thousand images: a p50 often lies where some exit's share of images crosses
    # a half, and over a hundred images that share is off by five points (one standard error) or so
    latency_images: int = Field(1000, ge=0)
    threads: int | None = Field(None, ge=1)
    # before timing, make glibc's malloc keep freed memory, as a CPU server should (dart_ee.core.malloc); it stays so
    # for the rest of the process, which then holds the memory of its largest batches
    keep_freed_memory: bool = True


class ServeConfig(_Strict):
    """`dart-ee serve`'s settings (dart_ee.serve): the batcher, the limits that keep a server up, and the socket."""

    # a stage-0 batch closes when it holds max_batch samples or its first request has waited max_wait_ms. With
    # 0 the inference thread takes whatever has arrived whenever it is free: at low load nobody waits, under load
    # batches fill while the thread computes. A wait only pays where a full batch is much cheaper per image
    max_batch: int = Field(32, ge=1, le=4096)
    max_wait_ms: float = Field(0.0, ge=0, le=10_000)
    # the scheduler runs the earliest stage with work first (easy requests are answered early); a sample in the
    # server for longer than max_hold_ms goes first, oldest first, whatever its stage: it bounds how long hard
    # samples can be held back under load (about one batch-1 pass of the whole network is a good value)
    max_hold_ms: float = Field(10.0, ge=0, le=10_000)
    # samples accepted and not yet answered; beyond it a request gets 503 with Retry-After, not a growing queue
    max_queue: int = Field(1024, ge=1)
    max_body_bytes: int = Field(8 * 2**20, ge=1024)  # a request body over this gets 413 before it is parsed
    threads: int | None = Field(None, ge=1)  # the inference thread's intra-op threads (default: all cores)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1)  # uvicorn processes, each with its own model and batcher
    warmup: bool = True  # run a full batch and one image before /readyz says ready


class ControllerSettings(_Strict):
    """The adaptive controller's settings (dart_ee.adapt.controller). `dart-ee adapt-tune` chooses them on development
    streams built from the calibration split and records them in RUN/adapt.json; these are the defaults."""

    audit_share: float = Field(0.02, ge=0, le=1)  # share of early exits that also run the full network
    window: int = Field(1000, ge=1)  # sliding window of recent inferences the updates read
    update_every: int = Field(4, ge=1)  # batches between coefficient updates
    z_gate: float = Field(2.0, ge=0)  # act only on accuracy gaps beyond this many standard errors
    ucb: bool = False  # let UCB1 choose a conservative / balanced / aggressive scale
    arm_spread: float = Field(0.05, ge=0, lt=1)  # UCB1's arms scale every threshold by 1 + s, 1 and 1 - s
    shift_guard: bool = True  # treat inputs as hard while alpha has left its calibration range
    shift_gate: float = Field(0.5, gt=0)  # the guard's trigger, in calibration standard deviations of alpha
    shift_scale: float = Field(1.2, ge=1)  # factor on every exit coefficient while the guard is on
    hard_quantile: float = Field(0.9, gt=0, lt=1)  # while on, alpha counts as at least this calibration quantile

    def problem(self) -> str | None:
        """What makes these settings incoherent (None when nothing does)."""
        if self.ucb and self.audit_share == 0:
            return ("ucb needs audits: UCB1's reward estimates accuracy from audited samples, and without them it would "
                    "trade accuracy it cannot see for MACs; set audit_share > 0 or ucb false")
        return None

    @model_validator(mode="after")
    def _coherent(self) -> ControllerSettings:
        if self.problem():
            raise ValueError(self.problem())
        return self


class RiskSettings(_Strict):
    """The online risk controller's settings (dart_ee.adapt.risk). `dart-ee adapt-tune` chooses them on development
    streams built from the calibration split (RUN/adapt.json, "risk"); these are the defaults."""

    audit_rate: float = Field(0.05, gt=0, le=1)  # q: share of samples marked for audit (those that left early run on)
    step: float = Field(0.002, gt=0)  # eta: how far one batch's weighted disagreement moves theta
    # b: samples per update (a batch is split into updates of this size); the guarantee's slack grows with b / q
    update_every: int = Field(16, ge=1)
    # the label-free shift guard (dart_ee.adapt.guard): a CUSUM on the first exit's confidence that holds theta at
    # >= guard_floor while raised; guard_threshold None turns it off. At k = 0.25, h = 20 a false alarm comes about
    # every 1.6e5 in-distribution samples; a large shift is flagged within tens of samples
    guard_threshold: float | None = Field(20.0, gt=0)
    guard_drift: float = Field(0.25, gt=0)
    guard_floor: float = Field(1.0, gt=0, le=1)


class AdaptConfig(_Strict):
    enabled: bool = True
    # the controller's settings: chosen on development streams from the calibration split (`tune`), the
    # `controller` values then being the search's default; with tune false, `controller` is used as given
    tune: bool = True
    controller: ControllerSettings = ControllerSettings()
    risk: RiskSettings = RiskSettings()  # the online risk controller's (dart_ee.adapt.risk), as `controller` is
    # reported on the test split: these corruption families (reporting-only ones, dart_ee.data.shift.REPORT)
    # at these severity grades, and the label-prior scenario where the paper's updates act
    families: list[str] = ["impulse", "pixelate", "brightness", "jpeg"]
    levels: list[Literal[1, 2, 3]] = [1, 2, 3]
    mechanisms: bool = True
    clean: int = Field(3000, ge=1)  # clean images before the shift
    shifted: int = Field(3000, ge=1)  # shifted images after it
    batch_size: int = Field(256, ge=1)

    @field_validator("families")
    @classmethod
    def _reporting_families(cls, v: list[str]) -> list[str]:
        from dart_ee.data.shift import FAMILIES, REPORT

        for f in v:
            if f not in FAMILIES:
                raise ValueError(f"unknown shift family {f!r}; the reporting families are {list(REPORT)}")
            if f not in REPORT:
                raise ValueError(f"{f!r} builds the development streams the controller's settings are chosen on; "
                                 f"report on the others: {list(REPORT)}")
        return v


class Config(_Strict):
    name: str = "experiment"
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    difficulty: Literal["paper", "learned"] = "paper"
    calibration: CalibrationConfig = CalibrationConfig()
    benchmark: BenchmarkConfig = BenchmarkConfig()
    adapt: AdaptConfig = AdaptConfig()
    # also train the same network on its final exit only (same recipe and budget) to show what joint
    # training costs the final exit; `dart-ee run` writes it to OUT/single_exit
    single_exit_baseline: bool = False


def _format_errors(e: ValidationError, source: str) -> str:
    lines = []
    for err in e.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown key (check the spelling)" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"  {field}: {msg}")
    return f"invalid config {source}:\n" + "\n".join(lines)


# adapt: fields of the first adaptation design. Its scenarios at their old defaults are what every run
# folder written before 2026-11-26 recorded: they are dropped (the reported shifts are now
# adapt.families and adapt.levels); its controller fields moved under adapt.controller.
_OLD_ADAPT = {"scenarios": ["noise", "blur", "contrast"], "severities": [0.1, 1.0, 0.7]}


def _upgrade_adapt(raw: dict[str, Any]) -> dict[str, Any]:
    a = raw.get("adapt")
    if not isinstance(a, dict):
        return raw
    a = dict(a)
    for k, old in _OLD_ADAPT.items():
        if k in a:
            if a[k] != old:
                raise ConfigError(f"adapt.{k} is gone: adaptation now reports the corruption families in "
                                  "adapt.families at the severity grades in adapt.levels (see dart_ee.data.shift)")
            del a[k]
    moved = {k: a.pop(k) for k in list(a) if k in ControllerSettings.model_fields}
    if moved:
        a["controller"] = {**moved, **(a.get("controller") or {})}
    return {**raw, "adapt": a}


def parse_config(raw: dict[str, Any], source: str = "") -> Config:
    try:
        return Config.model_validate(_upgrade_adapt(raw))
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings; values are parsed as YAML (``1``, ``true``, ``[1,2]``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.epochs=1")
        key, value = item.split("=", 1)
        node = raw
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p} is not a section")
        node[leaf] = yaml.safe_load(value)
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load and validate a YAML config (``None``: all defaults), then apply overrides."""
    raw: dict[str, Any] = {}
    source = "(defaults)"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return parse_config(apply_overrides(raw, overrides or []), source)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# Fields added after runs were made, with the default that is what those runs did: left out of the
# fingerprints at that default, so that existing runs stay current.
_ADDED_LATER = {("train", "optimizer"): "sgd", ("data", "image_size"): None, ("data", "stream"): False,
                ("data", "workers"): None, ("train", "max_steps"): None,
                ("adapt", "risk"): RiskSettings().model_dump(mode="json"), ("calibration", "inner_folds"): 0}


def _dump(cfg: Config, **kw: Any) -> dict:
    out = cfg.model_dump(mode="json", **kw)
    for (section, field), default in _ADDED_LATER.items():
        if out.get(section, {}).get(field, default) == default:
            out.get(section, {}).pop(field, None)
    return out


def config_fingerprint(cfg: Config) -> str:
    """Identifies a training recipe; where it runs (``train.device``) is not part of it, so a run can resume elsewhere."""
    return fingerprint(_dump(cfg, exclude={"train": {"device"}}))


# What each cached step reads from the config. Where it runs, how many threads and the evaluation batch
# size change no result, and calibration or benchmark settings are read only by later steps.
_STEP_INPUTS: dict[str, Any] = {
    "train": {"seed": True, "data": {"dataset", "cal_fraction", "split_seed", "train_subset", "test_subset", "image_size"},
              "model": True, "train": {"epochs", "max_steps", "batch_size", "lr", "optimizer", "momentum", "nesterov",
                                       "weight_decay", "label_smoothing", "exit_weights", "distill", "distill_temperature",
                                       "policy_lambda", "bf16", "channels_last", "crop_pad", "flip"}},
    "trace": {"seed": True, "data": {"dataset", "cal_fraction", "split_seed", "train_subset", "test_subset", "image_size"},
              "difficulty": True},
}


def step_fingerprint(cfg: Config, step: str, **inputs: str) -> str:
    """Identifies what a cached step (``train``, ``trace``) was made from: its config fields and ``inputs``
    (e.g. the fingerprint of the model it traced). Equal fingerprints mean its output can be reused."""
    return fingerprint({"fields": _dump(cfg, include=_STEP_INPUTS[step]), **inputs})


def changed_fields(old: Config, new: Config, step: str | None = None) -> list[str]:
    """Dotted names of the config fields that differ (those ``step`` reads), e.g. ``["train.epochs"]``."""
    def flat(d: dict, prefix: str = "") -> dict:
        out: dict = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    include = _STEP_INPUTS[step] if step else None
    a, b = flat(old.model_dump(mode="json", include=include)), flat(new.model_dump(mode="json", include=include))
    return [k for k in b if a.get(k) != b[k]]


def check_exit_lists(cfg: Config, num_exits: int) -> None:
    """Per-exit lists must have one entry per exit of the chosen model."""
    w = cfg.train.exit_weights
    if w is not None and len(w) != num_exits:
        raise ConfigError(f"train.exit_weights has {len(w)} entries but model {cfg.model.name!r} has "
                          f"{num_exits} exits; give one weight per exit or remove the key")
