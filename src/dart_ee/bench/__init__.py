"""Measurements: the wall-clock benchmark, its timing loops, energy, data-path speed."""
