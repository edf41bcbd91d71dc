"""A run folder's handle: loads what it holds on demand (the file names are ``dart_ee.core.runfiles``).

    run = Run("runs/cifar10_alexnet")
    cfg, model, est = run.config(), run.model(), run.estimators()
    cal, test = run.trace("cal"), run.trace("test")

Writers (``training.train``, ``tracing.trace_run``, ``pipeline.run_pipeline``) hold the folder's lock
(``dart_ee.core.lock``); whether an artifact is current is decided by the fingerprints it records
(``training.is_current``, ``tracing.is_current``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dart_ee import trace as trace_mod
from dart_ee.config import load_config
from dart_ee.core.runfiles import CONFIG, ESTIMATORS, MODEL, POLICY_DIR, trace_file
from dart_ee.difficulty.estimators import load_estimators
from dart_ee.models.custom import IMAGES, load_images
from dart_ee.policies import load_policy
from dart_ee.training.train import load_model, prepare_splits

if TYPE_CHECKING:
    import torch

    from dart_ee.config import Config
    from dart_ee.data.datasets import ImageSet
    from dart_ee.difficulty.estimators import LearnedDifficulty
    from dart_ee.models.net import MultiExitNet
    from dart_ee.policies import ExitPolicy
    from dart_ee.trace import Trace


class Run:
    """A run folder written by ``dart-ee train`` / ``dart-ee run``; every loader validates what it reads and
    none runs code the folder names unless trusted."""

    def __init__(self, path: str | Path, trust_code: bool | None = None) -> None:
        """``trust_code``: import the class a custom run names to rebuild its network (default: only inside
        ``dart_ee.trust_code()``, which the CLI's ``--trust-code`` opens); never for a run you did not write."""
        self.path = Path(path)
        self.trust_code = trust_code

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    def config(self) -> Config:
        return load_config(self.path / CONFIG)

    def model(self, optimize: bool = True, device: str | torch.device = "cpu") -> MultiExitNet:
        """The trained network; ``optimize`` gives the inference copy that traces and the runtime share."""
        return load_model(self.path / MODEL, optimize=optimize, trust_code=self.trust_code).to(device)

    def estimators(self, device: str | torch.device = "cpu") -> LearnedDifficulty:
        return load_estimators(self.path / ESTIMATORS).to(device)

    def trace(self, split: str) -> Trace:
        """The calibration (``"cal"``) or test trace, its split tag checked."""
        return trace_mod.load(self.path / trace_file(split), expect_split=split)

    def policy(self, name: str) -> ExitPolicy:
        """A fitted policy saved by ``dart-ee run`` (``RUN/policies/<name>.json``)."""
        return load_policy(self.path / POLICY_DIR / f"{name}.json")

    def images(self, split: str, data_dir: str | Path | None = None) -> ImageSet:
        """The ``"cal"`` or ``"test"`` images the run's traces were made from: from its data folder, checked
        against its split, or, for a run written from Python (``dart_ee.models.custom``), from the run folder.
        Decoded into memory, also for a streamed run (the tools that read them time the network, not the files)."""
        own = self.path / IMAGES.format(split=split)
        if own.is_file():
            return load_images(own)
        return getattr(prepare_splits(self.config(), self.path, data_dir), split).decoded()

    def test_images(self, data_dir: str | Path | None = None) -> ImageSet:
        """The test split the run measures on."""
        return self.images("test", data_dir)
