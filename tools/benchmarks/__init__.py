"""Benchmarks: speed, memory and agreement of the bundles, per-operator profiles, the prepared GPU run."""
