-- Audit: what kind each accepted item was (reconcile counts describes apart), and one row
-- per refused request, so that reconcile and the quarantine route can look at any window.

ALTER TABLE receipts ADD COLUMN kind text NOT NULL DEFAULT 'event';
CREATE INDEX receipts_tenant_received ON receipts (tenant, received_at);

CREATE TABLE quarantined (
    request_id    text        PRIMARY KEY,
    tenant        text        NOT NULL,
    sensor        text        NOT NULL,
    received_at   timestamptz NOT NULL,
    status        integer     NOT NULL,
    title         text        NOT NULL,
    problems      jsonb       NOT NULL,
    payload_bytes integer     NOT NULL,
    object_key    text        NOT NULL
);
CREATE INDEX quarantined_tenant_received ON quarantined (tenant, received_at);
