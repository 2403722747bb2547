"""Benchmarks: ketchd and the ketch shim against Debian's containerd 1.6, side by side (``python -m bench.run``)."""
