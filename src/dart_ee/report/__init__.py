"""Reports: report.md, figures, the paper's reference figures, and BENCHMARKS.md generated from records."""
