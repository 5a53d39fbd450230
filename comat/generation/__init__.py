"""Sampling with and without gradients, cross-attention capture, and the cached generation engine."""
