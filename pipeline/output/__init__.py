"""What guards an output across runs: one run at a time (the lease) and one identity."""
