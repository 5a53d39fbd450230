"""Experiment (session 7): `comat train` with the K gradient steps drawn from the second half of the schedule only.
Usage: python late_grad_steps.py train --preset toy ... (the comat CLI arguments)"""
import sys
import comat.methods.comat as cm
orig = cm.grad_step_indices
def late(T, K, generator=None):
    half = T // 2
    return [half + i for i in orig(T - half, min(K, T - half), generator)]
cm.grad_step_indices = late
from comat.cli import app
app(sys.argv[1:])
