"""Operating a cluster: what an operator asks of it (info, health), the embedded server, the web dashboard."""
