-- Ingest: per-key rate limits, receipts of accepted events, counters of refused input.

ALTER TABLE api_keys ADD COLUMN rate_per_s double precision CHECK (rate_per_s IS NULL OR rate_per_s > 0);

-- One row per accepted event: where the stream put it. Written in batches, off the request path.
CREATE TABLE receipts (
    event_id        text        NOT NULL,
    tenant          text        NOT NULL,
    sensor          text        NOT NULL,
    shard_id        text        NOT NULL,
    sequence_number numeric     NOT NULL,
    received_at     timestamptz NOT NULL,
    request_id      text        NOT NULL
);
CREATE INDEX receipts_received ON receipts (received_at);
CREATE INDEX receipts_event ON receipts (tenant, event_id);

-- Refused envelopes per tenant, sensor, UTC day and status. The payloads go to S3 (quarantine/...).
CREATE TABLE quarantine_counts (
    tenant  text    NOT NULL,
    sensor  text    NOT NULL,
    day     date    NOT NULL,
    status  integer NOT NULL,
    count   bigint  NOT NULL,
    bytes   bigint  NOT NULL,
    PRIMARY KEY (tenant, sensor, day, status)
);
