"""Reports of distillation sweeps from their result files (see docs/results-format.md); `report.py` is the entry point."""
