"""A policy file's certificate and its seal: the digest of what was certified, so that a file edited after
certification is never reported as certified. Torch-free, so a server that runs an export reads it too."""

from __future__ import annotations

import hashlib
import json
from typing import Any

__all__ = ["EDITED", "certificate", "policy_digest"]


def policy_digest(d: dict[str, Any]) -> str:
    """SHA-256 of a policy file's decision-making fields (name, parameters, fitted state), canonical JSON."""
    core = {k: d.get(k) for k in ("policy", "params", "fitted")}
    return hashlib.sha256(json.dumps(core, sort_keys=True, allow_nan=True).encode()).hexdigest()


EDITED = ("edited after certification: its parameters or fitted fields no longer match the digest its certificate "
          "records, so nothing is certified; certify it again with `dart-ee calibrate --confidence`")


def certificate(d: dict[str, Any]) -> dict[str, Any] | None:
    """The certificate of a policy file's dict, or None; a policy edited since it was certified gets one that says
    so and certifies nothing (a file without a digest predates sealing and is treated as edited too)."""
    g = (d.get("calibration") or {}).get("guarantee")
    if not isinstance(g, dict):
        return None
    if g.get("certified") and g.get("policy_digest") != policy_digest(d):
        return {**g, "certified": False, "statement": EDITED}
    return g
