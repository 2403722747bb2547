"""The Kubernetes CRI (runtime.v1) over ketch's core: a face, as ``services/`` is for
containerd's API. Images today; pods, containers and streaming build on the runtime's Task
objects next."""
