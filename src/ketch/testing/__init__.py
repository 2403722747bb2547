"""Helpers for testing with ketch (and for ketch's own tests and benchmarks): private daemons,
a busybox root filesystem, and cleanup of processes, mounts and cgroups by what a run owns."""
