"""Per-image difficulty alpha in [0, 1] (METHOD.md section 2), and a learned estimator beyond the paper.

``DifficultyEstimator`` is the paper's score (Eqs 1-8), computed from one image alone:
- edge density: the share of pixels whose Sobel magnitude exceeds tau_edge (a training-set quantile);
- pixel variance: spatial variance per channel, averaged over channels;
- gradient complexity: mean |Laplacian|.
Each term is scaled to [0, 1] by its 1st/99th training percentiles, then fused with weights w.

``LearnedDifficulty`` predicts how deep an image must go (the oracle exit depth) by ridge
regression on features that the runtime computes anyway: the pooled statistics of stage 1, exit 1's
softmax, and the paper's three terms. It is fitted on the calibration split with k-fold
cross-validation, because exit outputs on training images are over-confident.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dart_ee.core import artifacts
from dart_ee.core.errors import ArtifactError, ConfigError, InputError
from dart_ee.data.datasets import to_float

if TYPE_CHECKING:
    from dart_ee.models.net import MultiExitNet

TERMS = ("edge", "variance", "laplacian")

_GREY = (0.299, 0.587, 0.114)


def _filters(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sobel magnitude and Laplacian of the grey image, with replicate padding.

    Written as shifted-slice arithmetic rather than ``conv2d``: element-wise operations give every image
    bit-identical results whatever batch it is in (convolution kernels may pick different algorithms by
    batch size). Sobel is computed separably: a [1, 2, 1] smoothing then a [-1, 0, 1] difference.
    """
    grey = x[:, 0] if x.shape[1] == 1 else x[:, 0] * _GREY[0] + x[:, 1] * _GREY[1] + x[:, 2] * _GREY[2]
    p = F.pad(grey[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]  # (N, H+2, W+2)
    sv = p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]  # vertical smoothing, (N, H, W+2)
    sh = p[:, :, :-2] + 2 * p[:, :, 1:-1] + p[:, :, 2:]  # horizontal smoothing, (N, H+2, W)
    gx = sv[:, :, 2:] - sv[:, :, :-2]
    gy = sh[:, 2:] - sh[:, :-2]
    lap = p[:, :-2, 1:-1] + p[:, 2:, 1:-1] + p[:, 1:-1, :-2] + p[:, 1:-1, 2:] - 4 * p[:, 1:-1, 1:-1]
    return gx * gx + gy * gy, lap  # squared Sobel magnitude: comparing it with tau^2 saves a sqrt


def _image_mean(v: torch.Tensor) -> torch.Tensor:
    """Per-image mean over the pixels (each row is reduced on its own, so batching cannot change it)."""
    return v.flatten(1).float().mean(1)


def check_pixels(x: torch.Tensor) -> None:
    """Difficulty works on (N, 1|3, H, W) float pixels in [0, 1], before normalisation."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise InputError(f"expected a float tensor of pixels in [0, 1], got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != 4 or x.shape[1] not in (1, 3) or x.shape[2] < 3 or x.shape[3] < 3:
        raise InputError(f"expected images of shape (N, 1 or 3, H, W) with H, W >= 3, got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise InputError("empty batch: pass at least one image")
    lo, hi = torch.aminmax(x)  # one pass; NaN propagates into it, so the fast path also screens NaN
    if not (lo >= -1e-3 and hi <= 1 + 1e-3):
        if not torch.isfinite(x).all():
            raise InputError("images contain NaN or Inf pixels")
        raise InputError(f"pixels must lie in [0, 1] before normalisation, got [{float(lo):.3g}, "
                         f"{float(hi):.3g}]; pass raw images divided by 255")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation with average ranks for ties (depth has many)."""
    ra, rb = _rank(np.asarray(a, float)), _rank(np.asarray(b, float))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else 0.0


def _rank(v: np.ndarray) -> np.ndarray:
    _, inv, counts = np.unique(v, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inv]


def oracle_depth(correct: np.ndarray) -> np.ndarray:
    """Earliest exit (1-based) whose prediction is right, or N+1 when none is. ``correct``: (N, E) bool."""
    n_exits = correct.shape[1]
    return np.where(correct.any(1), correct.argmax(1) + 1, n_exits + 1)


class DifficultyEstimator(nn.Module):
    """The paper's alpha (Eqs 1-8). ``fit`` on training images, then ``forward(x) -> alpha``."""

    weights: torch.Tensor  # buffers, declared for the type checker
    tau_edge: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor

    def __init__(self, weights: Sequence[float] = (0.4, 0.3, 0.3), edge_quantile: float = 0.9) -> None:
        super().__init__()
        self.edge_quantile = float(edge_quantile)
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32))
        self.register_buffer("tau_edge", torch.tensor(float("nan")))
        self.register_buffer("lo", torch.zeros(3))
        self.register_buffer("hi", torch.ones(3))

    @property
    def fitted(self) -> bool:
        return bool(torch.isfinite(self.tau_edge))

    def raw_terms(self, x: torch.Tensor, check: bool = True) -> torch.Tensor:
        """(N, 3) unscaled edge density, pixel variance and mean |Laplacian|.

        ``check=False`` skips the input and fitted-state checks, which read values back to the host: a
        captured CUDA graph cannot contain them, so the queued runner checks its input once, up front.
        """
        if check:
            check_pixels(x)
            if not self.fitted:
                raise ArtifactError("DifficultyEstimator is not fitted: call fit(train_images) or load a fitted state")
        magnitude2, lap = _filters(x)
        edge = _image_mean(magnitude2 > self.tau_edge * self.tau_edge)
        variance = x.flatten(2).var(2, unbiased=False).mean(1)
        return torch.stack([edge, variance, _image_mean(lap.abs())], 1)

    def terms(self, x: torch.Tensor, check: bool = True) -> torch.Tensor:
        """(N, 3) terms scaled to [0, 1] by the fitted robust statistics."""
        return ((self.raw_terms(x, check) - self.lo) / (self.hi - self.lo).clamp_min(1e-12)).clamp(0, 1)

    def fuse(self, terms: torch.Tensor) -> torch.Tensor:
        w = self.weights
        return (terms[:, 0] * w[0] + terms[:, 1] * w[1] + terms[:, 2] * w[2]).clamp(0, 1)

    def forward(self, x: torch.Tensor, check: bool = True) -> torch.Tensor:
        return self.fuse(self.terms(x, check))

    @torch.no_grad()
    def fit(self, images: np.ndarray | torch.Tensor, batch_size: int = 2000, seed: int = 0) -> DifficultyEstimator:
        """Fit tau_edge (the ``edge_quantile`` of Sobel magnitudes) and the 1st/99th percentile scaling."""
        gen = np.random.default_rng(seed)
        mags = []
        for s in range(0, len(images), batch_size):
            x = to_float(images[s: s + batch_size])
            check_pixels(x)
            m = _filters(x)[0].flatten().sqrt()
            mags.append(m[torch.from_numpy(gen.choice(len(m), min(len(m), 200_000), replace=False))])
        self.tau_edge.fill_(float(torch.quantile(torch.cat(mags), self.edge_quantile)))
        raw = torch.cat([self.raw_terms(to_float(images[s: s + batch_size])) for s in range(0, len(images), batch_size)])
        self.lo.copy_(torch.quantile(raw, 0.01, dim=0))
        self.hi.copy_(torch.quantile(raw, 0.99, dim=0))
        return self

    def flops(self, image_shape: Sequence[int]) -> dict:
        """FLOPs per image, counted by hand: the filters are element-wise slice arithmetic, which
        ``FlopCounterMode`` does not count (it counts matmuls and convolutions only)."""
        c, h, w = image_shape
        p = h * w
        by_hand = {
            "grey conversion (3 mul + 2 add per pixel)": 5 * p if c == 3 else 0,
            "Sobel, separable (2 x (3 smoothing + 1 difference) per pixel)": 8 * p,
            "squared Sobel magnitude (2 mul, 1 add)": 3 * p,
            "edge threshold against tau^2 and mean (compare, add)": 2 * p,
            "Laplacian (4 add, 1 mul)": 5 * p,
            "mean |Laplacian| (abs, add)": 2 * p,
            "pixel variance (sub, square, add per value; per channel)": 3 * c * p + 2 * c,
            "scaling, clipping and fusion": 3 * 4 + 6,
        }
        return {"by_hand": by_hand, "total": sum(by_hand.values()),
                "method": "counted by hand: the filters are element-wise operations, which "
                          "torch.utils.flop_counter.FlopCounterMode does not count (it reports 0 for them)"}


class LearnedDifficulty(nn.Module):
    """Ridge regression of log(oracle exit depth) on features the runtime computes anyway.

    Features: exit 1's softmax (sorted, unsorted and the log of its top three), its margin and
    entropy, and the paper's three scaled terms. (Per-channel statistics of stage 1 were tried and
    dropped: they made the cross-validated correlation worse.) ``forward`` returns alpha in [0, 1];
    a larger alpha means the image is expected to need a deeper exit.
    """

    paper: DifficultyEstimator
    mu: torch.Tensor  # buffers, declared for the type checker
    sd: torch.Tensor
    coef: torch.Tensor
    bias: torch.Tensor
    ridge: torch.Tensor
    scale: torch.Tensor

    def __init__(self, paper: DifficultyEstimator, n_features: int = 0) -> None:
        super().__init__()
        self.paper = paper
        self.register_buffer("mu", torch.zeros(n_features))
        self.register_buffer("sd", torch.ones(n_features))
        self.register_buffer("coef", torch.zeros(n_features))
        self.register_buffer("bias", torch.zeros(()))
        self.register_buffer("ridge", torch.zeros(()))
        self.register_buffer("scale", torch.ones(()))

    @staticmethod
    def features(terms: torch.Tensor, stage1: torch.Tensor, logits1: torch.Tensor) -> torch.Tensor:
        del stage1  # accepted so that richer estimators can read it; this one does not need it
        p = F.softmax(logits1.float(), 1)
        top = p.sort(1, descending=True).values
        logtop = top[:, :3].clamp_min(1e-9).log()
        ent = -(p * p.clamp_min(1e-12).log()).sum(1, keepdim=True) / np.log(p.shape[1])
        # sorted probabilities say how sure exit 1 is; unsorted ones say which class (some are harder)
        return torch.cat([top, ent, p, logtop, logtop[:, :1] - logtop[:, 1:2], terms], 1)

    def macs(self, model: MultiExitNet) -> dict[str, int]:
        """MACs (FLOPs / 2) per image of the paper's and of the learned estimator (added to every exit's cost)."""
        paper = self.paper.flops(model.input_shape)["total"] // 2
        shape = model.feature_shapes()[0]  # (C, H, W) feature maps or (tokens, D)
        # softmax, sort, logs and entropy of exit 1's K outputs (about 12 K), then standardisation and
        # one dot product (4 FLOPs a feature)
        was = model.training
        model.eval()
        n_classes = model.heads[0](torch.zeros(1, *shape, device=next(model.parameters()).device)).shape[1]
        model.train(was)
        learned = paper + (12 * n_classes + 4 * self.coef.numel()) // 2
        return {"paper": int(paper), "learned": int(learned)}

    def forward(self, x: torch.Tensor, stage1: torch.Tensor, logits1: torch.Tensor, check: bool = True) -> torch.Tensor:
        return self.predict(self.features(self.paper.terms(x, check), stage1, logits1))

    def score(self, source: str, x: torch.Tensor, stage1: torch.Tensor | None = None,
              logits1: torch.Tensor | None = None, check: bool = True) -> torch.Tensor:
        """The difficulty score a policy reads (``source``: "paper" or "learned", its ``alpha_source_``): the one
        place that chooses between them, for the eager and queued runners and the exported graph alike. The
        learned one also reads stage 1's output and exit 1's logits."""
        if source == "paper":
            return self.paper(x, check)
        if source != "learned" or stage1 is None or logits1 is None:
            raise ConfigError(f"difficulty source {source!r}: 'paper', or 'learned' with stage 1's output and logits")
        return self(x, stage1, logits1, check)

    def predict(self, feats: torch.Tensor) -> torch.Tensor:
        if self.coef.numel() != feats.shape[1]:
            raise ArtifactError("LearnedDifficulty is not fitted for these features; call fit() first")
        return ((((feats - self.mu) / self.sd) @ self.coef + self.bias) / self.scale).clamp(0, 1)

    @torch.no_grad()
    def fit(self, feats: np.ndarray, depth: np.ndarray, num_exits: int, folds: int = 5, seed: int = 0,
            ridges: Sequence[float] = (0.1, 1, 10, 100, 1000, 10000)) -> np.ndarray:
        """Choose the ridge penalty by k-fold CV on Spearman, fit on all data; return out-of-fold alphas."""
        X = np.asarray(feats, np.float64)
        t = np.log(np.asarray(depth, np.float64))  # log depth: the many exit-1 cases don't swamp the rest
        fold = np.random.default_rng(seed).permutation(len(t)) % folds
        best_score, best_lam, best_oof = -2.0, float(ridges[0]), np.zeros(len(t))
        for lam in ridges:
            oof = np.zeros(len(t))
            for k in range(folds):
                tr = fold != k
                oof[~tr] = _ridge_predict(X[tr], t[tr], X[~tr], lam)
            score = spearman(oof, depth)
            if score > best_score:
                best_score, best_lam, best_oof = score, float(lam), oof
        lam = best_lam
        mu, sd = X.mean(0), X.std(0) + 1e-8
        coef, bias = _ridge_fit((X - mu) / sd, t, lam)
        n = X.shape[1]
        for name, val in (("mu", mu), ("sd", sd), ("coef", coef)):
            setattr(self, name, torch.tensor(val, dtype=torch.float32).reshape(n))
        self.bias = torch.tensor(float(bias))
        self.ridge = torch.tensor(float(lam))
        self.scale = torch.tensor(float(np.log(num_exits + 1)))  # log(N+1) maps the deepest depth to 1
        return np.clip(best_oof / float(self.scale), 0, 1)

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        n = state["coef"].numel()  # fitted buffers are sized by the data; resize before loading
        for name in ("mu", "sd", "coef"):
            setattr(self, name, torch.zeros(n))
        return super().load_state_dict(state, strict, assign)


def _ridge_fit(Xs: np.ndarray, t: np.ndarray, lam: float) -> tuple[np.ndarray, float]:
    tm = t.mean()
    coef = np.linalg.solve(Xs.T @ Xs + lam * np.eye(Xs.shape[1]), Xs.T @ (t - tm))
    return coef, tm


def _ridge_predict(Xtr: np.ndarray, t: np.ndarray, Xte: np.ndarray, lam: float) -> np.ndarray:
    mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-8
    coef, b = _ridge_fit((Xtr - mu) / sd, t, lam)
    return ((Xte - mu) / sd) @ coef + b


def fit_weights(terms: np.ndarray, depth: np.ndarray, trials: int = 500, folds: int = 5,
                seed: int = 0) -> dict:
    """Eq 8 weight search: random simplex weights, scored by Spearman(alpha, depth) with k-fold CV.

    The default (0.4, 0.3, 0.3) is among the candidates. The reported CV score of "fitted" is that of
    the weights chosen on the training folds, evaluated on the held-out fold, so it is honest.
    """
    rng = np.random.default_rng(seed)
    cands = np.vstack([[0.4, 0.3, 0.3], np.eye(3), rng.dirichlet(np.ones(3), trials)])
    alphas = np.clip(terms @ cands.T, 0, 1)  # (N, candidates)
    fold = rng.permutation(len(depth)) % folds

    def scores(idx: np.ndarray) -> np.ndarray:
        return np.array([spearman(alphas[idx, j], depth[idx]) for j in range(len(cands))])

    cv_fitted, cv_default = [], []
    for k in range(folds):
        best = int(np.argmax(scores(fold != k)))
        held = fold == k
        cv_fitted.append(spearman(alphas[held, best], depth[held]))
        cv_default.append(spearman(alphas[held, 0], depth[held]))
    best = int(np.argmax(scores(np.arange(len(depth)))))
    return {"weights": cands[best].tolist(), "default_weights": [0.4, 0.3, 0.3],
            "cv_spearman_fitted": float(np.mean(cv_fitted)), "cv_spearman_default": float(np.mean(cv_default)),
            "spearman_fitted": spearman(alphas[:, best], depth), "spearman_default": spearman(alphas[:, 0], depth),
            "spearman_terms": {n: spearman(terms[:, i], depth) for i, n in enumerate(TERMS)},
            "folds": folds, "trials": trials}


def fit_estimators(train_images: np.ndarray, seed: int = 0) -> LearnedDifficulty:
    """Fit the paper's estimator on training images; the learned one is fitted later on calibration data."""
    return LearnedDifficulty(DifficultyEstimator().fit(train_images, seed=seed))


def save_estimators(est: LearnedDifficulty, path: str | Path) -> None:
    artifacts.save_torch(path, {"format": "dart-ee-difficulty", "version": 1, "state_dict": est.state_dict(),
                                "edge_quantile": est.paper.edge_quantile})


def load_estimators(path: str | Path) -> LearnedDifficulty:
    ck = artifacts.load_torch(path, "difficulty estimator")
    if not isinstance(ck, dict) or ck.get("format") != "dart-ee-difficulty":
        raise ArtifactError(f"{path} is not a dart-ee difficulty estimator file")
    est = LearnedDifficulty(DifficultyEstimator(edge_quantile=ck["edge_quantile"]))
    try:
        est.load_state_dict(ck["state_dict"])
    except (RuntimeError, KeyError) as e:  # fields added or renamed since the file was written
        raise ArtifactError(f"{path} does not match this version's difficulty estimators ({str(e).splitlines()[0]}); "
                            "regenerate it with `dart-ee trace --run RUN`") from None
    return est.eval()
