"""Benchmarks that compare against a baseline in the same run: `python -m engine.bench {loader,...}`."""
