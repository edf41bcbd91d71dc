"""The calibration record: what calibrating a policy returns, and what its policy file keeps under "calibration".

Typed as ``TypedDict``s, so that mypy checks every key a module reads or writes (a misspelt key is an error,
not a silent None), while the record stays the JSON it always was: a policy file holds it verbatim, and files
written before these types existed read the same. One home for its shape: producers (``certify``,
``calibrate``, ``inner``) build it, readers (reports, export, quantisation, the CLI) read it through these names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypedDict, cast

from dart_ee.core.errors import ArtifactError


class Target(TypedDict, total=False):
    """What was asked for: a certified or uncertified budget, or a trade-off."""

    mode: Literal["certified", "uncertified budget", "trade-off"]
    max_drop: float | None
    confidence: float | None
    risk: str
    beta_opt: float | None
    note: str


class Guarantee(TypedDict, total=False):
    """The certificate of a certified budget: what is promised, on how many samples, by which test."""

    certified: bool
    max_drop: float
    confidence: float | None
    delta: float | None
    risk: str
    in_expectation: bool
    n_cert: int
    n_fit: int
    fit_share: float
    split_seed: int
    cert_fingerprint: str
    cal_fingerprint: str
    candidate: dict[str, Any]
    candidate_index: int
    method: str
    p_value: float | None
    p_value_first_rejected: float | None
    candidates_tested: int
    adjusted_risk: float | None
    cert_risk_points: float
    statement: str
    not_guaranteed: str
    policy_digest: str  # added when the policy is saved: the seal of what was certified


class _Required(TypedDict):
    target: Target
    params: dict[str, Any]
    policy: str
    calibration: dict[str, Any]  # dart_ee.calibration.evaluation.evaluate on the calibration (or cert) samples
    budget_met: bool
    trace: dict[str, Any]  # the trace's run, config fingerprint, dataset and split


class CalibrationRecord(_Required, total=False):
    """One policy's calibration: target, chosen parameters, calibration metrics and (certified) the guarantee."""

    guarantee: Guarantee
    candidates_tried: int  # uncertified search
    fit_split_winner: dict[str, Any]  # DART's scaled path: the fit-split winner it scales
    inner_choice: dict[str, Any]  # dart_ee.calibration.inner: the settings chosen on the fit split, and why


def is_certified(rec: CalibrationRecord) -> bool | None:
    """True / False for a certified calibration, None where nothing was certified (uncertified search, trade-off)."""
    g = rec.get("guarantee")
    return None if g is None else bool(g.get("certified"))


def recorded(policy_file: Mapping[str, Any], where: str = "policy file") -> CalibrationRecord | None:
    """The calibration record a policy file's dict holds (None: it holds none, e.g. a policy set by hand)."""
    rec = policy_file.get("calibration")
    if rec is None:
        return None
    if not (isinstance(rec, dict) and isinstance(rec.get("target", {}), dict)
            and isinstance(rec.get("guarantee", {}), dict)):
        raise ArtifactError(f"{where}: 'calibration' is not the record `dart-ee calibrate` writes (target and guarantee "
                            "are objects); calibrate the policy again")
    return cast(CalibrationRecord, rec)
