"""Policies fitted and judged on traces: evaluation, certified budgets (Learn-then-Test), comparison,
frontiers, coverage."""
