"""Support for tests and benchmarks: deterministic full-size weights, as the reference data were made."""
