"""Benchmarks whose output the README quotes; each runs with one command."""
