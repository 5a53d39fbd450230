"""Judges: the models benchmarks use to score generated images."""
