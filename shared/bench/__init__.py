"""Benchmarks: every hot path has a command that prints figures (`onnxfn bench`)."""
