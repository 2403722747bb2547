"""containerd-shim-ketch-v2: the per-task (or per-group) supervisor speaking shim v2 over ttrpc."""
