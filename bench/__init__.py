"""Benchmarks and the experiment harness: task builders, the communication calculator."""
