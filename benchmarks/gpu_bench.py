"""GPU benchmark of the eager and the queued runner (issue 13): one process, every run and batch size.

    python benchmarks/gpu_bench.py OUT_DIR runs/cifar10_alexnet [runs/...]

For each run: the static network, certified DART and the threshold, under both runners, at batch 256
(with batch-1 latency), 1,024 and 4,096; each record is ``OUT_DIR/<run>_b<B>.json`` (``dart-ee
benchmark --json`` format). About a minute per run on an H100 or H200.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dart_ee.bench.benchmark import benchmark, table_markdown
from dart_ee.core import artifacts
from dart_ee.core.malloc import keep_freed_memory

BATCHES = (256, 1024, 4096)
IMAGES = 32768  # per timed repetition: energy counters need windows of a good fraction of a second


def main(out: Path, runs: list[Path], device: str = "cuda", batches: tuple[int, ...] = BATCHES, images: int = IMAGES,
         repeats: int = 5, latency_images: int = 1000) -> None:
    """Every record; batch-1 latency with the first batch size. The keywords are for a rehearsal on the CPU (tests)."""
    keep_freed_memory()  # as the dart-ee command does (dart_ee.core.malloc): the host side is timed too
    for run in runs:
        policies = [run / "policies" / "dart.json", run / "policies" / "threshold.json"]
        for b in batches:
            rec = benchmark(run, policies, b, images, repeats=repeats, latency_images=latency_images if b == batches[0] else 0,
                            device=device, runners=("eager", "queued"))
            artifacts.write_json(out / f"{run.name}_b{b}.json", rec)
            print(f"## {run.name}, batch {b}, {rec['hardware'].get('gpu')}, energy: {rec['energy_source']}")
            print(table_markdown(rec), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), [Path(a) for a in sys.argv[2:]])
