"""Benchmarks in general: the protocol, the adapter base class, the registry that finds adapters, pinned data
files, the runner behind every ``comat eval``, and the prompt attack's optimiser. The adapters themselves live in
the ``benchmarks/`` folder (installed as ``comat_benchmarks``), which imports this package and never the reverse."""
