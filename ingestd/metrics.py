"""Every Prometheus metric ingestd exports, on the daemon's own registry (no globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.received = Counter("ingestd_messages_received", "MQTT messages received", registry=r)
        self.accepted = Counter(
            "ingestd_messages_accepted", "Messages that became readings in the spool", registry=r
        )
        self.ignored = Counter(
            "ingestd_messages_ignored",
            "Messages that carry no reading by design (e.g. Homie $ attributes)",
            registry=r,
        )
        self.rejected = Counter(
            "ingestd_messages_rejected",
            "Messages kept as dead letters, by reason",
            ["reason"],
            registry=r,
        )
        self.series_devices = Gauge(
            "ingestd_series_devices",
            "Devices whose series the guard remembers (forgotten after latest.ttl of silence)",
            registry=r,
        )
        self.series_capped = Gauge(
            "ingestd_series_capped_devices",
            "Devices at guard.max_series_per_device or max_tag_sets_per_device: their readings"
            " with new series are dead letters too_many_series",
            registry=r,
        )
        self.retained = Counter(
            "ingestd_retained_messages",
            "Retained messages the broker replayed at subscribe, by outcome (stored: the"
            " device's own timestamp; the others skipped, see mqtt.retained)",
            ["outcome"],
            registry=r,
        )
        self.internal_errors = Counter(
            "ingestd_internal_errors",
            "Internal errors on the message path, by stage (a bug: report it with the log's"
            " error id); the message is a dead letter with reason internal_error",
            ["stage"],
            registry=r,
        )
        self.unacked_bytes = Gauge(
            "ingestd_unacked_bytes",
            "Bytes held in memory between receipt and durable commit (mqtt.max_unacked_bytes)",
            registry=r,
        )
        self.intake_paused = Gauge(
            "ingestd_intake_paused",
            "1 while ingestd does not read the broker: too much awaits a commit (a full spool)",
            registry=r,
        )
        self.readings = Counter(
            "ingestd_readings_spooled", "Readings written to the spool", registry=r
        )
        self.spool_records = Gauge(
            "ingestd_spool_records", "Readings in the spool not yet written to the TSDB", registry=r
        )
        self.spool_bytes = Gauge("ingestd_spool_bytes", "Bytes of spool on disk", registry=r)
        self.spool_oldest = Gauge(
            "ingestd_spool_oldest_seconds",
            "How long the oldest reading not yet written to the TSDB has waited in the spool"
            " (since its commit; 0 when none)",
            registry=r,
        )
        self.spool_full = Gauge(
            "ingestd_spool_full",
            "1 while the spool's disk budget is exhausted (acks stopped)",
            registry=r,
        )
        self.commit_seconds = Histogram(
            "ingestd_spool_commit_seconds",
            "Spool group commit duration (write + fsync)",
            registry=r,
        )
        self.loop_lag = Histogram(
            "ingestd_loop_lag_seconds",
            "How late the event loop ran a timer: time something else held it",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.gc_pause = Histogram(
            "ingestd_gc_pause_seconds",
            "Cyclic garbage collections, by generation (they hold the event loop)",
            ["generation"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )
        self.batches = Counter("ingestd_batches_written", "Batches the TSDB accepted", registry=r)
        self.points_written = Counter(
            "ingestd_points_written", "Readings the TSDB accepted", registry=r
        )
        self.write_errors = Counter(
            "ingestd_write_errors",
            "Failed TSDB write requests, by HTTP status ('connection' when none)",
            ["status"],
            registry=r,
        )
        self.write_seconds = Histogram(
            "ingestd_write_seconds", "TSDB write request duration", registry=r
        )
        self.lag = Gauge(
            "ingestd_lag_seconds",
            "Receipt to TSDB-accepted time of the newest reading written",
            registry=r,
        )
        self.quota_dropped = Counter(
            "ingestd_quota_dropped",
            "Valid messages dropped for exceeding a quota (acknowledged, not stored)",
            ["rule", "device", "limit"],
            registry=r,
        )
        self.quota_notices = Counter(
            "ingestd_quota_notices", "Throttle notices published to devices", registry=r
        )
        self.quota_shared = Gauge(
            "ingestd_quota_shared",
            "1 while quotas are enforced in Redis for all instances, 0 on local fallback",
            registry=r,
        )
        self.quota_devices = Gauge(
            "ingestd_quota_devices", "Devices with quota state in this process", registry=r
        )
        self.latest_writes = Counter(
            "ingestd_latest_writes",
            "Writes of the latest values (one round trip each, every latest.interval)",
            registry=r,
        )
        self.latest_write_errors = Counter(
            "ingestd_latest_write_errors",
            "Writes of the latest values that failed (Redis down or slow); the values wait",
            registry=r,
        )
        self.latest_values_written = Counter(
            "ingestd_latest_values_written",
            "Device and field values written to the latest values",
            registry=r,
        )
        self.latest_pending = Gauge(
            "ingestd_latest_pending",
            "Device and field values waiting for a failed write to be retried",
            registry=r,
        )
        self.rules_loaded = Gauge("ingestd_rules_loaded", "Alert rules in force", registry=r)
        self.rule_reloads = Counter("ingestd_rule_reloads", "Successful rule reloads", registry=r)
        self.rule_reload_errors = Counter(
            "ingestd_rule_reload_errors", "Rule reloads refused (old rules kept)", registry=r
        )
        self.alert_events = Counter(
            "ingestd_alert_events",
            "Alert transitions, by kind and severity",
            ["kind", "severity"],
            registry=r,
        )
        self.rule_errors = Counter(
            "ingestd_rule_errors",
            "Internal errors evaluating rules (a bug: report it)",
            registry=r,
        )
        self.rule_evaluations = Counter(
            "ingestd_rule_evaluations", "Rule conditions evaluated against a reading", registry=r
        )
        self.alerts = Gauge("ingestd_alerts", "Alerts by state now", ["state"], registry=r)
        self.alert_publish_dropped = Counter(
            "ingestd_alert_publish_dropped",
            "Alert messages dropped because the broker was away too long (queue full)",
            registry=r,
        )
        # Notifications: ``channel`` is the channel's configured name, never its URL.
        self.notifications_sent = Counter(
            "ingestd_notifications_sent",
            "Notifications delivered (one per alert event, route and channel)",
            ["channel"],
            registry=r,
        )
        self.notifications_failed = Counter(
            "ingestd_notifications_failed",
            "Notifications given up (undelivered after notify.max_age, or over the budget)",
            ["channel"],
            registry=r,
        )
        self.notifications_retried = Counter(
            "ingestd_notifications_retried",
            "Failed delivery attempts of a notification that will be retried",
            ["channel"],
            registry=r,
        )
        self.notifications_pending = Gauge(
            "ingestd_notifications_pending",
            "Notifications in the outbox not delivered yet",
            ["channel"],
            registry=r,
        )
        self.notifications_oldest = Gauge(
            "ingestd_notifications_oldest_pending_seconds",
            "Age of the oldest notification not delivered yet (0 when none)",
            ["channel"],
            registry=r,
        )
        self.notify_calls = Counter(
            "ingestd_notify_calls",
            "Calls to a notification channel, by outcome (ok, error, timeout)",
            ["channel", "outcome"],
            registry=r,
        )
        self.notify_breaker_open = Gauge(
            "ingestd_notify_breaker_open",
            "1 while a channel's circuit breaker is open or probing",
            ["channel"],
            registry=r,
        )
        self.notify_fallbacks = Counter(
            "ingestd_notify_fallbacks",
            "Notifications handed to a route's fallback route, by the route that failed",
            ["route"],
            registry=r,
        )
        self.notify_escalations = Counter(
            "ingestd_notify_escalations",
            "Alerts escalated for want of an acknowledgement, by the route escalated from",
            ["route"],
            registry=r,
        )
        self.notify_muted = Counter(
            "ingestd_notify_muted",
            "Notifications dropped in quiet hours (quiet_action: drop), by route",
            ["route"],
            registry=r,
        )
        self.http_connections = Gauge(
            "ingestd_http_connections", "Open connections to the HTTP endpoint", registry=r
        )
        self.http_closed = Counter(
            "ingestd_http_connections_closed",
            "HTTP connections ingestd closed itself, by reason: header_timeout (no whole"
            " request head within http.header_timeout), idle (kept alive longer than"
            " http.idle_timeout), evicted (the least recently active idle one, to make room"
            " past http.max_connections), refused (past it with none idle)",
            ["reason"],
            registry=r,
        )
        self.reconnects = Counter("ingestd_mqtt_reconnects", "MQTT reconnects", registry=r)
        self.connected = Gauge(
            "ingestd_mqtt_connected", "1 while connected to the broker", registry=r
        )
        self.session_lost = Counter(
            "ingestd_mqtt_session_lost",
            "Times ingestd's broker session was lost with what the broker held for it, by"
            " cause: taken_over (another client connected with its client id), not_present"
            " (gone on reconnect before its expiry), expired (away longer than its expiry)",
            ["cause"],
            registry=r,
        )
        # --- PostgreSQL: device registry, alert history ---
        self.registry_devices = Gauge(
            "ingestd_registry_devices", "Devices in the registry (as cached here)", registry=r
        )
        self.registry_updates = Counter(
            "ingestd_registry_updates", "Device changes received by LISTEN/NOTIFY", registry=r
        )
        self.registry_registered = Counter(
            "ingestd_registry_registered",
            "Unknown devices registered (registry.unknown: register)",
            registry=r,
        )
        self.history_written = Counter(
            "ingestd_alert_history_written",
            "Alert transitions written to PostgreSQL",
            registry=r,
        )
        self.history_pending = Gauge(
            "ingestd_alert_history_pending",
            "Alert transitions waiting in the local queue for PostgreSQL",
            registry=r,
        )
        self.history_errors = Counter(
            "ingestd_alert_history_errors",
            "Failed attempts to write alert history to PostgreSQL",
            registry=r,
        )
        self.cluster_partitions = Gauge(
            "ingestd_cluster_partitions",
            "Rule partitions this instance owns (cluster.enabled)",
            registry=r,
        )
        self.cluster_forwarded = Counter(
            "ingestd_cluster_forwarded",
            "Readings forwarded to their partition's stream in Redis, for the rules",
            registry=r,
        )
        self.cluster_forward_waiting = Gauge(
            "ingestd_cluster_forward_waiting",
            "Readings waiting for Redis to take them (Redis down or slow)",
            registry=r,
        )
        self.cluster_forward_dropped = Counter(
            "ingestd_cluster_forward_dropped",
            "Readings the rules never saw: cluster.forward_max exceeded while Redis was down",
            registry=r,
        )
        self.cluster_handovers = Counter(
            "ingestd_cluster_handovers",
            "Partitions taken over (gained) or given up (released, lost)",
            ["how"],
            registry=r,
        )
        self.redis_round_trips = Counter(
            "ingestd_cluster_redis_round_trips",
            "Round trips to Redis made by the cluster (forwarding, reading, leases, saves)",
            registry=r,
        )
