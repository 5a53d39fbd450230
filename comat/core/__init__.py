"""The floor every other layer stands on: errors, atomic file writes, the runtime (devices, cache directory,
environment record), config loading, result files, training checkpoints and name registries."""
