"""Benchmarks for the MoE layer: ``python -m bench.layer_bench`` and ``python -m bench.profile_layer``."""
