"""The adaptive controller's settings file, ``RUN/adapt.json``: which settings a run's controller uses and where
they were chosen (``dart_ee.adapt.tuning`` chooses them on the calibration split). Read by the controller, the
study and the benchmark; written by ``adapt-tune`` and ``dart-ee run``."""

from __future__ import annotations

from pathlib import Path

from dart_ee.config import ControllerSettings, RiskSettings
from dart_ee.core import artifacts
from dart_ee.core.errors import ArtifactError
from dart_ee.core.runfiles import ADAPT_SETTINGS as SETTINGS_FILE

FORMAT = "dart-ee-adapt-settings"


def given(policy_path: str | Path, settings: ControllerSettings, source: str, risk: RiskSettings | None = None) -> dict:
    """A settings record for settings that were not chosen on data (``source`` says where they come from)."""
    return {"format": FORMAT, "version": 1, "tuned": False, "settings": settings.model_dump(), "source": source,
            "chosen_on": None, "policy_file": str(policy_path), "policy_fingerprint": policy_fingerprint(policy_path),
            "risk": {"settings": (risk or RiskSettings()).model_dump(), "source": source}}


def policy_fingerprint(policy_path: str | Path) -> str:
    return artifacts.fingerprint(artifacts.read_json(policy_path, "policy file"))


def save_settings(run_dir: str | Path, record: dict) -> Path:
    return artifacts.write_json(Path(run_dir) / SETTINGS_FILE, record)


def settings_record(run_dir: str | Path) -> dict | None:
    """``RUN/adapt.json`` as written by ``save_settings`` (None when the run has none)."""
    path = Path(run_dir) / SETTINGS_FILE
    if not path.is_file():
        return None
    rec = artifacts.read_json(path, "adaptation settings")
    if rec.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a dart-ee adaptation settings file; run dart-ee adapt-tune --run "
                            f"{run_dir} to write it again")
    return rec


def load_risk_settings(run_dir: str | Path) -> tuple[RiskSettings, dict]:
    """The run's online risk controller settings and where they came from (the defaults when none were chosen)."""
    rec = settings_record(run_dir)
    if rec is None or "risk" not in rec:
        return RiskSettings(), {"source": "defaults (dart_ee.config.RiskSettings): not chosen on data"}
    return RiskSettings(**rec["risk"]["settings"]), {"source": rec["risk"].get("source", f"{SETTINGS_FILE}: chosen on "
                                                                                            "development streams")}


def load_settings(run_dir: str | Path) -> tuple[ControllerSettings, dict]:
    """The run's controller settings and where they came from (the defaults when it has no ``adapt.json``)."""
    rec = settings_record(run_dir)
    if rec is None:
        return ControllerSettings(), {"source": "defaults (dart_ee.config.ControllerSettings): not chosen on data"}
    return ControllerSettings(**rec["settings"]), {
        "source": rec.get("source", f"{SETTINGS_FILE}: chosen on development streams"), "chosen_on": rec.get("chosen_on"),
        "policy_file": rec.get("policy_file"), "policy_fingerprint": rec.get("policy_fingerprint")}


def is_current(run_dir: str | Path, policy_path: str | Path) -> bool:
    """Whether ``RUN/adapt.json`` holds settings chosen on data for this policy as it is now (a re-calibrated
    policy needs new settings)."""
    rec = settings_record(run_dir)
    return (rec is not None and bool(rec.get("tuned")) and "risk" in rec
            and "guard_threshold" in rec["risk"]["settings"]  # chosen with the shift guard among the candidates
            and rec.get("policy_fingerprint") == policy_fingerprint(policy_path))
