"""Benchmark adapters: one module per benchmark, registered with its protocol."""
