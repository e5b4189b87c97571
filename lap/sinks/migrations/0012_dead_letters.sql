-- Stream records a shard consumer could not process however often it tried (a record that is not LAP's, or one
-- whose events break aggregation or the commit): kept in S3 under `key`, counted here, and passed over so the
-- shard goes on (docs/decisions.md, "Dead letters"). A replay that stores their events sets replayed_at.
CREATE TABLE dead_letters (
    stream           text        NOT NULL,
    shard_id         text        NOT NULL,
    sequence_number  numeric     NOT NULL,
    tenant           text,                   -- NULL: the record is not LAP's, so its tenant is unknown
    sensor           text,
    received_at      timestamptz,
    events           integer     NOT NULL,
    reason           text        NOT NULL,
    key              text        NOT NULL,
    dead_lettered_at timestamptz NOT NULL DEFAULT now(),
    replayed_at      timestamptz,
    replay_id        text,
    PRIMARY KEY (stream, shard_id, sequence_number)
);
CREATE INDEX dead_letters_by_tenant ON dead_letters (tenant, received_at);
