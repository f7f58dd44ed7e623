"""Benchmarks, and the lab's original training loop kept as their baseline (``lab_baseline``)."""
