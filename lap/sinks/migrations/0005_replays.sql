-- Replays asked for through the Output API (`POST /v1/audit/replay`), with their progress and result.
CREATE TABLE replays (
    id           text        PRIMARY KEY,
    tenant       text        NOT NULL,
    requested_at timestamptz NOT NULL DEFAULT now(),
    window_start timestamptz NOT NULL,
    window_end   timestamptz NOT NULL,
    stages       text[]      NOT NULL,
    source       text        NOT NULL CHECK (source IN ('archive', 'stream')),
    status       text        NOT NULL CHECK (status IN ('running', 'done', 'failed')),
    progress     jsonb       NOT NULL DEFAULT '{}',
    result       jsonb,
    error        text,
    finished_at  timestamptz
);
CREATE INDEX replays_tenant ON replays (tenant, requested_at);
