"""A label-free shift guard for online risk control: a two-sided CUSUM on the first exit's confidence.

Audits see a shift only through the disagreements of the samples they mark: at an audit rate q and a
disagreement rate r, the first audited disagreement comes after about 1 / (q r) samples (400 at q = 5%, r = 5%),
and every disagreement before it may cost accuracy. Every sample, though, runs the first exit, so its top-1
confidence there is observed at no cost and before any label or audit. The guard maps it to a normal score
through the calibration split's empirical distribution, z = Phi^-1(F_cal(c)), so in-distribution inputs give
z ~ N(0, 1) on any network, and runs Page's (1954) two-sided CUSUM

    S+ <- min(2h, max(0, S+ + z - k)),    S- <- min(2h, max(0, S- - z - k))

raising the alarm while max(S+, S-) > h. While it is raised the risk controller runs at least ``floor`` on its
path (1: the full network). It only ever makes the policy more conservative, so the online guarantee of
``dart_ee.adapt.risk`` stands as stated there (with the alarm raised and theta >= 1 nothing leaves early either).

What k (drift) and h (threshold) trade, by Siegmund's approximation for a one-sided CUSUM on N(0, 1) scores:
in-distribution, a false alarm every ARL0 = (exp(2 k h') - 2 k h' - 1) / (2 k^2) samples per side, h' = h + 1.166
(3.2e5 at the defaults k = 0.25, h = 20, so about 1.6e5 for the two sides together); a shift of the mean score
by delta > k is flagged after about h' / (delta - k) samples (44 at delta = 0.73). The cap 2h bounds how long
the alarm outlasts a shift: about h / k clean samples (80 at the defaults). Not caught: a shift that leaves the
first exit's confidences as they were (the audits still see it, more slowly).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.stats import norm

from dart_ee.core.errors import ConfigError

OVERSHOOT = 1.166  # Siegmund's correction of the CUSUM threshold for a normal score (E[overshoot] ~ 0.583 * 2)


def false_alarm_every(drift: float, threshold: float) -> float:
    """In-distribution samples between false alarms of one side (Siegmund's approximation, module docstring)."""
    a = 2 * drift * (threshold + OVERSHOOT)
    return (math.exp(a) - a - 1) / (2 * drift ** 2)


class ShiftGuard:
    """Two-sided CUSUM on the normal scores of the first exit's top-1 confidence (module docstring).

    ``reference``: the calibration split's first-exit confidences; ``drift``: k; ``threshold``: h; ``floor``: the
    least conservativeness (theta) the risk controller runs at while the alarm is raised."""

    def __init__(self, reference: np.ndarray, drift: float, threshold: float, floor: float) -> None:
        if drift <= 0 or threshold <= 0 or not 0 < floor <= 1:
            raise ConfigError(f"shift guard: drift and threshold must be > 0 and floor in (0, 1]; got {drift}, "
                              f"{threshold}, {floor}")
        ref = np.sort(np.asarray(reference, dtype=np.float64))
        if len(ref) < 100 or not np.isfinite(ref).all():
            raise ConfigError(f"shift guard: its reference needs at least 100 finite calibration confidences, got "
                              f"{len(ref)}")
        self.reference, self.drift, self.threshold, self.floor = ref, drift, threshold, floor
        self.up = self.down = 0.0
        self.alarms = 0  # samples observed while the alarm was raised

    @property
    def alarm(self) -> bool:
        return max(self.up, self.down) > self.threshold

    def scores(self, conf: np.ndarray) -> np.ndarray:
        """Normal scores of first-exit confidences under the calibration split's distribution (mid-ranks for ties)."""
        c = np.asarray(conf, dtype=np.float64)
        rank = (np.searchsorted(self.reference, c, "left") + np.searchsorted(self.reference, c, "right")) / 2
        return norm.ppf((rank + 0.5) / (len(self.reference) + 1))

    def observe(self, conf: np.ndarray) -> None:
        """Feed the first-exit confidences of a batch's samples, in order; the alarm is then up to date."""
        cap, k = 2 * self.threshold, self.drift
        up, down = self.up, self.down
        for z in self.scores(conf).tolist():  # sequential by definition; Python floats are fastest for a loop
            up = min(cap, max(0.0, up + z - k))
            down = min(cap, max(0.0, down - z - k))
            self.alarms += max(up, down) > self.threshold
        self.up, self.down = up, down

    def state_dict(self) -> dict[str, Any]:
        return {"up": self.up, "down": self.down, "alarms": self.alarms}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.up, self.down, self.alarms = float(s["up"]), float(s["down"]), int(s["alarms"])
