"""PostgreSQL and Redis: the shared state of one or several ingestd instances.

    postgres.py   connection settings, the async pool, `ingestd db migrate` and the schema check
    migrations/   versioned SQL, applied in order, each in one transaction
    registry.py   the device registry: loaded once, kept current by LISTEN/NOTIFY, cached
    history.py    alert history: queued locally, written to PostgreSQL in batches
    commands.py   `ingestd db migrate`, `ingestd devices ...`, `ingestd alerts history`
    redis.py      the one Redis client of a daemon (quotas and latest values share it)

Nothing on the hot path waits for either server: the registry is a dict in memory and
every write goes through a local queue that survives an outage and a restart.
"""
