"""Shared helpers at the bottom of the package: errors, atomic files, the run-folder lock and file names, the
code-trust switch, provenance, threads, defaults, malloc."""
