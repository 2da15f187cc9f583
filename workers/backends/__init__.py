"""Backends run one job step by step. `base.Backend` is the interface; `sim` runs on the simulated GPU."""
