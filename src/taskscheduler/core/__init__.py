"""The core: every state change of a job is decided here (the lifecycle), on records read from the store."""
