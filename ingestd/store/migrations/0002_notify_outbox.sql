-- ingestd schema 2: the notification outbox in PostgreSQL (notify.outbox: postgres), the
-- same tables as the local outbox (ingestd/notify/outbox.py), shared by every instance.

CREATE TABLE notify_entries (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key         text NOT NULL UNIQUE,
    route       text NOT NULL,
    channel     text NOT NULL,
    alert       text NOT NULL,
    kind        text NOT NULL,
    severity    text NOT NULL,
    event       jsonb NOT NULL,
    created_at  double precision NOT NULL,
    not_before  double precision NOT NULL,
    state       text NOT NULL DEFAULT 'pending',
    attempts    integer NOT NULL DEFAULT 0,
    last_error  text,
    done_at     double precision,
    message     text,
    fell_back   boolean NOT NULL DEFAULT false
);
CREATE INDEX notify_entries_pending ON notify_entries (channel, id) WHERE state = 'pending';
CREATE INDEX notify_entries_age ON notify_entries (created_at) WHERE state = 'pending';
CREATE INDEX notify_entries_done ON notify_entries (done_at) WHERE state <> 'pending';
CREATE INDEX notify_entries_failed ON notify_entries (done_at DESC) WHERE state = 'failed';

CREATE TABLE notify_timers (
    id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key     text NOT NULL UNIQUE,
    alert   text NOT NULL,
    route   text NOT NULL,
    due_at  double precision NOT NULL,
    event   jsonb NOT NULL,
    state   text NOT NULL
);
CREATE INDEX notify_timers_due ON notify_timers (due_at) WHERE state = 'pending';
CREATE INDEX notify_timers_alert ON notify_timers (alert);
CREATE INDEX notify_timers_fired ON notify_timers (alert) WHERE state = 'fired';
CREATE INDEX notify_timers_done ON notify_timers (due_at) WHERE state IN ('cancelled', 'closed');

CREATE TABLE notify_channels (
    name        text PRIMARY KEY,
    breaker     text NOT NULL,
    failures    integer NOT NULL,
    opened_at   double precision NOT NULL,
    retry_at    double precision NOT NULL,
    last_error  text NOT NULL,
    last_ok     double precision,
    updated_at  double precision NOT NULL
);
