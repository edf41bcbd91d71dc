"""The files a run folder holds, named once: every module that reads or writes a run takes the names from here
(``dart_ee.runs.run.Run`` loads them; writers hold the folder's lock, ``dart_ee.core.lock``)."""

CONFIG = "config.yaml"  # the resolved config the run was made with
SPLIT = "split.json"  # the calibration split (indices, seed, data fingerprint)
CHECKPOINT = "checkpoint.pt"  # training state after the last finished epoch
MODEL = "model.pt"  # the trained multi-exit network
METRICS = "metrics.json"  # its per-exit accuracies, MACs and fingerprints
ESTIMATORS = "difficulty.pt"  # the fitted difficulty estimators (paper and learned)
RESULTS = "results.json"  # every figure `dart-ee run` reports
POLICY_DIR = "policies"  # fitted policy JSON files
SINGLE_EXIT = "single_exit"  # the "Baseline (No EE)" network, a run of its own inside this one
ADAPT_SETTINGS = "adapt.json"  # the adaptive controller's settings and where they were chosen (dart_ee.adapt.tuning)
STUDY = "adapt/study.json"  # every adaptation figure of the run (dart_ee.adapt.study.study)
SUPERSEDED = "superseded"  # artifacts `dart-ee run` moved aside because their inputs changed


def trace_file(split: str) -> str:
    """``trace_cal.npz`` or ``trace_test.npz`` (each with its ``.json`` metadata beside it)."""
    return f"trace_{split}.npz"


TRACE_FILES = (trace_file("cal"), "trace_cal.json", trace_file("test"), "trace_test.json", ESTIMATORS)
