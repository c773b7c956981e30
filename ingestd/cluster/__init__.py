"""Several ingestd instances as one system: membership (heartbeats), partition leases, and
the rules evaluated once per device across the cluster. Everything meets in Redis."""
