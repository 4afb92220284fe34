"""Benchmarks (`convstack bench train|client|serve`): each prints its figures and saves JSON."""
