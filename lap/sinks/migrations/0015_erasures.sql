-- Erasure: a learner's (or a whole tenant's) events taken out of every store, and the tombstone that proves it
-- and keeps them out (docs/decisions.md, "Erasure").

-- The tombstones. A row is written before any data goes, and stays: the learner's hashed IRI (never the IRI),
-- who asked, when, and how many events each store gave up. Consumers, the index writer and replays drop the
-- events of every learner named here; `id` also tells them when the list changed.
CREATE TABLE erasures (
    id            bigserial   PRIMARY KEY,
    job_id        text        NOT NULL UNIQUE,
    tenant        text        NOT NULL,
    learner_hash  text,                    -- sha256 of the tenant and the learner's IRI; NULL: the whole tenant
    learner       text,                    -- the IRI itself, only while the erasure runs (set NULL when done)
    requested_by  text        NOT NULL,    -- the key's id (or "cli")
    requested_at  timestamptz NOT NULL DEFAULT now(),
    status        text        NOT NULL CHECK (status IN ('running', 'done', 'failed')),
    counts        jsonb       NOT NULL DEFAULT '{}',
    progress      jsonb       NOT NULL DEFAULT '{}',
    error         text,
    finished_at   timestamptz,
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    attempts      integer     NOT NULL DEFAULT 1
);
CREATE UNIQUE INDEX erasures_once ON erasures (tenant, coalesce(learner_hash, ''));
CREATE INDEX erasures_running ON erasures (heartbeat_at) WHERE status = 'running';

-- Each erased event, by a fingerprint of its id (lap.process.dedup.fingerprints), not its id: reconcile tells
-- an erased event from a missing one by it. `document_id` is kept only until the event's document has left the
-- index; `index_counted`: its `indexed` counter was taken back.
CREATE TABLE erased_events (
    tenant        text        NOT NULL,
    fingerprint   bigint      NOT NULL,
    erasure_id    bigint      NOT NULL REFERENCES erasures (id),
    received_at   timestamptz NOT NULL,
    sensor        text        NOT NULL,
    shard_id      text        NOT NULL,
    document_id   text,
    index_counted boolean     NOT NULL DEFAULT false,
    was_indexed   boolean     NOT NULL DEFAULT false,
    PRIMARY KEY (tenant, fingerprint)
);
CREATE INDEX erased_events_received ON erased_events (tenant, received_at);
CREATE INDEX erased_events_in_index ON erased_events (erasure_id) WHERE document_id IS NOT NULL;

-- The archive objects an erasure rewrote: the old object goes once nothing can still be reading it.
CREATE TABLE erasure_objects (
    erasure_id  bigint      NOT NULL REFERENCES erasures (id),
    old_key     text        NOT NULL,
    new_key     text        NOT NULL,
    events      integer     NOT NULL,   -- the learner's events it held
    describes   integer     NOT NULL,   -- of which describes (not aggregated)
    receipts    integer     NOT NULL,   -- copies renamed in its batch's receipts
    old_deleted boolean     NOT NULL DEFAULT false,
    PRIMARY KEY (erasure_id, old_key)
);

-- Which learners each archive object holds: 32-bit hashes of their IRIs (lap.sinks.archive.learner_hashes), so
-- that an erasure or an export reads only the objects that may hold the learner. NULL: written before this
-- release, read whatever it holds.
ALTER TABLE archive_objects ADD COLUMN learners integer[];

-- A deleted tenant (`lap tenant delete`): its keys are revoked, its data erased, and its name is never given out
-- again (its tombstone would drop the new tenant's events).
ALTER TABLE tenants ADD COLUMN deleted_at timestamptz;
