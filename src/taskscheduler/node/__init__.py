"""A queue node: the node loop, its heartbeat, the forked worker manager and workers, the typed pipe messages,
self-fencing, and the node's metrics."""
