-- Stream processing: shard checkpoints and leases, the batch manifest, dedup state,
-- per-learner aggregates, index progress and the per-stage audit counters.
-- A consumer commits a batch's manifest, dedup rows, aggregates, checkpoint and
-- counters in ONE transaction; so these tables always agree with each other.

-- One row per shard ever seen. `sequence_number` is the last record whose effects are
-- committed (NULL: start at the oldest record). The lease fences a consumer that lost it:
-- every commit checks `lease_epoch`.
CREATE TABLE shard_checkpoints (
    stream          text        NOT NULL,
    shard_id        text        NOT NULL,
    parent_ids      text[]      NOT NULL DEFAULT '{}',
    sequence_number numeric,
    finished        boolean     NOT NULL DEFAULT false,
    lease_owner     text,
    lease_epoch     bigint      NOT NULL DEFAULT 0,
    lease_expires   timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, shard_id)
);

-- The manifest: a batch (a run of one shard's records) is part of the archive only once
-- its row is committed. Archive objects without a row are orphans.
CREATE TABLE batches (
    id           bigserial   PRIMARY KEY,
    stream       text        NOT NULL,
    shard_id     text        NOT NULL,
    first_seq    numeric     NOT NULL,
    last_seq     numeric     NOT NULL,
    records      integer     NOT NULL,
    events       integer     NOT NULL,
    describes    integer     NOT NULL,
    duplicates   integer     NOT NULL,
    committed_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (stream, shard_id, first_seq)
);

CREATE TABLE archive_objects (
    key           text        PRIMARY KEY,
    batch_id      bigint      NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    tenant        text        NOT NULL,
    received_hour timestamptz NOT NULL,
    records       integer     NOT NULL,
    bytes         integer     NOT NULL
);
CREATE INDEX archive_objects_batch ON archive_objects (batch_id);
CREATE INDEX archive_objects_hour ON archive_objects (tenant, received_hour);

-- Dedup: every event id committed within the window, and where it was committed.
CREATE TABLE seen_events (
    tenant          text        NOT NULL,
    event_id        text        NOT NULL,
    received_at     timestamptz NOT NULL,
    batch_id        bigint      NOT NULL,
    shard_id        text        NOT NULL,
    sequence_number numeric     NOT NULL,
    PRIMARY KEY (tenant, event_id)
);
CREATE INDEX seen_events_received ON seen_events (received_at);
CREATE INDEX seen_events_batch ON seen_events (batch_id);

-- Aggregates. A missing course is '' (it is part of the key).
CREATE TABLE learner_days (
    tenant         text             NOT NULL,
    learner        text             NOT NULL,
    course         text             NOT NULL,
    day            date             NOT NULL,
    events         bigint           NOT NULL,
    submissions    bigint           NOT NULL,
    score_count    bigint           NOT NULL,
    score_sum      double precision NOT NULL,
    score_max      double precision,
    max_score_sum  double precision NOT NULL,
    time_on_task_s double precision NOT NULL,
    first_active   timestamptz      NOT NULL,
    last_active    timestamptz      NOT NULL,
    PRIMARY KEY (tenant, learner, course, day)
);
CREATE INDEX learner_days_course ON learner_days (tenant, course, day);

CREATE TABLE learner_day_actions (
    tenant  text   NOT NULL,
    learner text   NOT NULL,
    course  text   NOT NULL,
    day     date   NOT NULL,
    action  text   NOT NULL,
    count   bigint NOT NULL,
    PRIMARY KEY (tenant, learner, course, day, action)
);

CREATE TABLE course_days (
    tenant text   NOT NULL,
    course text   NOT NULL,
    day    date   NOT NULL,
    events bigint NOT NULL,
    PRIMARY KEY (tenant, course, day)
);

-- Monday 00:00-01:00 UTC is hour 0, Sunday 23:00-24:00 is hour 167.
CREATE TABLE course_hours_of_week (
    tenant       text     NOT NULL,
    course       text     NOT NULL,
    hour_of_week smallint NOT NULL CHECK (hour_of_week BETWEEN 0 AND 167),
    events       bigint   NOT NULL,
    PRIMARY KEY (tenant, course, hour_of_week)
);

-- The index writer's own cursor: the last committed batch of each shard it has indexed.
CREATE TABLE index_cursors (
    stream     text        NOT NULL,
    shard_id   text        NOT NULL,
    last_seq   numeric     NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, shard_id)
);

-- Documents OpenSearch refused for good (a mapping conflict, say), with the reason.
CREATE TABLE index_failures (
    tenant    text        NOT NULL,
    event_id  text        NOT NULL,
    batch_id  bigint      NOT NULL,
    status    integer     NOT NULL,
    reason    text        NOT NULL,
    failed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, event_id)
);

-- Counts of events per stage, by the hour LAP received them: what reconcile adds up.
-- stage: accepted (ingest receipts), archived, aggregated, indexed, duplicates, describes.
CREATE TABLE stage_counts (
    tenant        text        NOT NULL,
    sensor        text        NOT NULL,
    shard_id      text        NOT NULL,
    received_hour timestamptz NOT NULL,
    stage         text        NOT NULL,
    events        bigint      NOT NULL,
    PRIMARY KEY (tenant, received_hour, sensor, shard_id, stage)
);

-- The audit actor's live view of each shard, flushed every few seconds.
CREATE TABLE shard_status (
    stream        text        NOT NULL,
    shard_id      text        NOT NULL,
    lag_ms        bigint,
    archived_seq  numeric,
    indexed_seq   numeric,
    archived      bigint      NOT NULL DEFAULT 0,
    aggregated    bigint      NOT NULL DEFAULT 0,
    indexed       bigint      NOT NULL DEFAULT 0,
    duplicates    bigint      NOT NULL DEFAULT 0,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, shard_id)
);
