"""One run: training and testing (train), config checks (validate), resuming, RNG state, the NaN guard,
the sweep objective, the run's provenance and the garbage collector around its imports."""
