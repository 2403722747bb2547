"""Helpers for testing with ketch (and for ketch's own tests and benchmarks): private daemons,
a busybox root filesystem, and what a run left behind (processes, runc containers, mounts,
cgroups, shim sockets, bundles), reported before it is removed."""
