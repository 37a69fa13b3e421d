"""The MongoDB implementation of the storage seam (:mod:`taskscheduler.store.protocol`), one module a concept:
connection (clients, driver errors), documents (sizes, fingerprints, update expressions), deployment (collections,
indexes, the server's clock), ledger (room in a capped job collection), jobs, once (add_job_once keys), events,
registry (queue nodes), reads (what operators ask), trends (the dashboard's run trends and error column), feeds
(change streams) and store (all of them in one :class:`~taskscheduler.store.mongo.store.Store`).
:mod:`taskscheduler.store` exports what the rest of the library uses."""
