"""The per-image difficulty score: the paper's alpha, the learned estimator, and their analysis."""
