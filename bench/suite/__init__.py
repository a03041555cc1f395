"""The benchmark suite behind bench/run.py (see bench/README.md)."""
