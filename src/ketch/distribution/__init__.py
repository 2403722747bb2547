"""Images as registries and archives hold them (the OCI distribution and image specs): image
references, a registry client, manifests and indexes, chain ids and the garbage-collection
labels containerd puts on them. A leaf: pure logic and HTTP, nothing of ketchd's core, so that
the daemon's pulls (the CRI) and the client library's share it."""
