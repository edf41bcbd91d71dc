"""The DART paper's published figures, for side-by-side tables. They are the paper's claims, not results.

Sources: the paper's Table I ("Performance and Difficulty-Aware Analysis", measured on an A100 with
modelled latency) and the original README's CIFAR-10 table (which names no model). A report prints
them next to its own measured figures and never mixes the two.
"""

from __future__ import annotations

TABLE_I_COLUMNS = ("accuracy", "time_ms", "energy_mj", "power_w", "speedup", "power_eff", "daes")

# Table I: (dataset, model) -> method -> the columns above (accuracy %, ms, mJ, W, x, x, DAES)
PAPER_TABLE_I: dict[tuple[str, str], dict[str, tuple[float, ...]]] = {
    ("mnist", "alexnet"): {
        "static": (98.97, 0.09, 5.90, 65.56, 1.0, 1.00, 0.562),
        "branchynet": (99.13, 0.08, 5.27, 65.88, 1.13, 1.12, 0.713),
        "rl": (99.49, 0.06, 2.29, 38.20, 1.50, 2.57, 2.179),
        "dart": (99.31, 0.03, 1.15, 38.33, 3.0, 5.13, 8.684),
    },
    ("cifar10", "alexnet"): {
        "static": (85.29, 0.08, 5.18, 64.75, 1.0, 1.00, 0.461),
        "branchynet": (83.15, 0.07, 4.57, 65.29, 1.14, 1.13, 0.579),
        "rl": (84.42, 0.05, 1.84, 36.73, 1.60, 2.82, 1.888),
        "dart": (82.86, 0.05, 1.88, 37.60, 1.60, 2.76, 1.978),
    },
    ("cifar10", "resnet18"): {
        "static": (88.32, 0.27, 17.66, 65.41, 1.0, 1.00, 0.477),
        "branchynet": (87.72, 0.16, 10.43, 65.19, 1.69, 1.69, 1.354),
        "rl": (87.87, 0.14, 8.10, 57.84, 1.93, 2.18, 1.998),
        "dart": (85.35, 0.12, 7.53, 62.75, 2.25, 2.35, 2.439),
    },
    ("cifar10", "vgg16"): {
        "static": (79.16, 0.20, 9.41, 47.05, 1.0, 1.00, 0.428),
        "branchynet": (81.82, 0.11, 3.70, 46.25, 1.82, 2.54, 4.63),
        "rl": (80.89, 0.10, 3.91, 39.13, 2.00, 2.40, 2.021),
        "dart": (80.20, 0.06, 2.54, 42.33, 3.33, 3.71, 5.356),
    },
}

# The original README's "Accuracy vs. Computational Savings (CIFAR-10)": method -> accuracy %, FLOPs reduction %, throughput
README_SAVINGS: dict[str, dict[str, float]] = {
    "baseline": {"accuracy": 91.2, "flops_reduction": 0, "throughput": 1.0},
    "threshold": {"accuracy": 89.8, "flops_reduction": 35, "throughput": 1.4},
    "branchynet": {"accuracy": 90.1, "flops_reduction": 32, "throughput": 1.3},
    "dart": {"accuracy": 90.9, "flops_reduction": 45, "throughput": 1.7},
}
