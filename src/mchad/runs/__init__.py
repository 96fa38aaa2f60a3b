"""One run: training and testing (train), config checks (validate), resuming, RNG state, the NaN guard,
the sweep objective and the run's provenance."""
