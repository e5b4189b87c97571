-- The index found empty (the in-memory stand-in after a restart, or a new domain): the live cursors start at the
-- tip, so new events are indexed at once, and each shard's committed batches up to the tip are indexed again from
-- the archive behind them, with a cursor of their own (docs/decisions.md, "Index: rebuilt behind new events").
-- A shard's row goes when its backfill is done.
CREATE TABLE index_backfill (
    stream         text        NOT NULL,
    shard_id       text        NOT NULL,
    until_seq      numeric     NOT NULL,  -- the last batch committed when the rebuild began
    after_seq      numeric,               -- the backfill's cursor: batches through here are indexed (NULL: none yet)
    since          timestamptz,           -- batches received before this are past index.retention_days: skipped
    batches_total  integer     NOT NULL,
    batches_done   integer     NOT NULL DEFAULT 0,
    started_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, shard_id)
);
