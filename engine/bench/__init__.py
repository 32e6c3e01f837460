"""Benchmarks that compare against a baseline in the same run: `python -m engine.bench {e2e,step,loader,quality}`.

Each records the commit, command, machine and date of its figures through `measure.record`."""
