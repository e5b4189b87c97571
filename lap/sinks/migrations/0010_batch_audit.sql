-- The audit trail and dedup per batch, not per event (docs/decisions.md, "Audit trail").
--
-- Receipts now live in the archive bucket (one object per batch, tenant and hour, written
-- by the shard consumer from what it read), and dedup state in the consumers' memory. The
-- `receipts` and `seen_events` tables get no new rows: their rows are still read for the
-- windows they cover, and the sweep deletes them as they pass the dedup window.

-- What each batch stored, as 8-byte fingerprints, until the consumer saves the dedup state
-- of their time bucket to the archive bucket (then NULL); and the newest receipt time.
ALTER TABLE batches ADD COLUMN fingerprints bytea;
ALTER TABLE batches ADD COLUMN max_received_at timestamptz;
CREATE INDEX batches_unsaved_fingerprints ON batches (stream, shard_id) WHERE fingerprints IS NOT NULL;

-- The newest receipt time a shard's consumer has committed: events received after it (less
-- the put deadline) may still be in the stream, and reconcile reports them as pending.
ALTER TABLE shard_checkpoints ADD COLUMN received_at timestamptz;

-- A shard's saved dedup buckets: sorted fingerprints in the archive bucket under `key`.
CREATE TABLE dedup_segments (
    stream       text        NOT NULL,
    shard_id     text        NOT NULL,
    bucket_start timestamptz NOT NULL,
    key          text        NOT NULL,
    events       integer     NOT NULL,
    written_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, shard_id, bucket_start)
);

-- Ingest's counters are what it acknowledged to sensors; `accepted` is now what the
-- consumers read from the stream (every copy, committed with each batch).
UPDATE stage_counts SET stage = 'acknowledged' WHERE stage = 'accepted';
