-- ingestd schema 1: sites, devices, calibrations, alert history.
-- Applied by `ingestd db migrate` in one transaction; recorded in ingestd_schema.

CREATE TABLE sites (
    id          text PRIMARY KEY,
    name        text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE devices (
    id               text PRIMARY KEY,
    site_id          text REFERENCES sites (id) ON DELETE SET NULL,
    kind             text NOT NULL DEFAULT '',
    enabled          boolean NOT NULL DEFAULT true,
    quota_rate       double precision CHECK (quota_rate > 0),
    quota_burst      integer CHECK (quota_burst >= 1),
    auto_registered  boolean NOT NULL DEFAULT false,
    note             text NOT NULL DEFAULT '',
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX devices_site_id ON devices (site_id);

CREATE TABLE calibrations (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id   text NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    field       text NOT NULL,
    "offset"    double precision NOT NULL DEFAULT 0,
    scale       double precision NOT NULL DEFAULT 1 CHECK (scale <> 0),
    valid_from  timestamptz NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    created_by  text NOT NULL DEFAULT '',
    UNIQUE (device_id, field, valid_from)
);

-- One row per alert (an engine alert id), updated through its transitions.
CREATE TABLE alert_events (
    id               text PRIMARY KEY,
    rule             text NOT NULL,
    device_id        text NOT NULL,
    site             text NOT NULL DEFAULT '',
    field            text NOT NULL,
    measurement      text NOT NULL DEFAULT '',
    level            text NOT NULL,
    state            text NOT NULL,
    value            double precision,
    threshold        double precision,
    started_at       timestamptz NOT NULL,
    fired_at         timestamptz,
    resolved_at      timestamptz,
    acknowledged_at  timestamptz,
    acknowledged_by  text,
    reason           text,
    labels           jsonb NOT NULL DEFAULT '{}',
    updated_at       timestamptz NOT NULL
);
CREATE INDEX alert_events_started ON alert_events (started_at DESC);
CREATE INDEX alert_events_device ON alert_events (device_id, started_at DESC);
CREATE INDEX alert_events_rule_device ON alert_events (rule, device_id, started_at DESC);
CREATE INDEX alert_events_resolved ON alert_events (resolved_at) WHERE resolved_at IS NOT NULL;
-- At most one open alert per (rule, device, field).
CREATE UNIQUE INDEX alert_events_one_open ON alert_events (rule, device_id, field)
    WHERE resolved_at IS NULL;

-- The registry is kept current in every daemon by LISTEN ingestd_registry: the payload
-- is the device id whose row (or calibrations) changed.
CREATE FUNCTION ingestd_registry_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    row_data record;
BEGIN
    IF TG_OP = 'DELETE' THEN
        row_data := OLD;
    ELSE
        row_data := NEW;
    END IF;
    IF TG_TABLE_NAME = 'devices' THEN
        PERFORM pg_notify('ingestd_registry', row_data.id);
        IF TG_OP = 'UPDATE' AND OLD.id <> NEW.id THEN
            PERFORM pg_notify('ingestd_registry', OLD.id);
        END IF;
    ELSE
        PERFORM pg_notify('ingestd_registry', row_data.device_id);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER devices_notify AFTER INSERT OR UPDATE OR DELETE ON devices
    FOR EACH ROW EXECUTE FUNCTION ingestd_registry_notify();
CREATE TRIGGER calibrations_notify AFTER INSERT OR UPDATE OR DELETE ON calibrations
    FOR EACH ROW EXECUTE FUNCTION ingestd_registry_notify();
