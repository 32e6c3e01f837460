"""The layer beneath pack, engine, kernels and measure: the error contract, safe file writes and hashing.

It imports nothing of the packages above it, so each of them can use it without reaching sideways into another.
"""
