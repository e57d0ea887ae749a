"""Benchmarks: measurements of gradzip's code paths on real model shapes."""
