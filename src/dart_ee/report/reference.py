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

# Table II: LeViT on CIFAR-10, model -> method -> (accuracy %, MMACs, time ms, speedup x); Table I's LeViT rows
# (accuracy %, ms, mJ, W, x, x, DAES) are added to PAPER_TABLE_I below.
PAPER_TABLE_II: dict[str, dict[str, tuple[float, ...]]] = {
    "levit_128s": {"static": (95.80, 282.1, 11.55, 1.00), "dart": (81.73, 56.4, 4.56, 2.53)},
    "levit_192": {"static": (96.91, 601.1, 19.94, 1.00), "dart": (80.33, 120.2, 5.57, 3.58)},
    "levit_256": {"static": (97.28, 1053.3, 62.55, 1.00), "dart": (86.11, 210.7, 18.89, 3.31)},
}
PAPER_TABLE_I.update({
    ("cifar10", "levit_128s"): {"static": (95.80, 11.55, 750.75, 65.00, 1.0, 1.00, 0.518),
                                "dart": (81.73, 4.56, 150.10, 32.92, 2.53, 5.00, 5.588)},
    ("cifar10", "levit_192"): {"static": (96.91, 19.94, 1296.10, 65.00, 1.0, 1.00, 0.524),
                               "dart": (80.33, 5.57, 259.18, 46.53, 3.58, 5.00, 7.772)},
    ("cifar10", "levit_256"): {"static": (97.28, 62.55, 4065.75, 65.00, 1.0, 1.00, 0.526),
                               "dart": (86.11, 18.89, 813.30, 43.05, 3.31, 5.00, 7.704)},
})

# Parameter counts the papers give (ImageNet models, 1,000 classes; LeViT's with its distillation head): the
# DART paper's section IV for the CNNs and LeViT-128S, the LeViT paper's Table 1 for LeViT-192 and -256.
PAPER_PARAMS: dict[str, float] = {"alexnet": 61e6, "resnet18": 11e6, "vgg16": 138e6, "levit_128s": 7.8e6,
                                  "levit_192": 11.0e6, "levit_256": 18.9e6}
