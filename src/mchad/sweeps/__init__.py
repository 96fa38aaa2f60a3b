"""Many runs: multirun trials and their report (sweep), resuming a sweep (sweep_resume), search sweeps (search)."""
