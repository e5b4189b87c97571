-- Archive objects a manifest names but S3 no longer has, found by the periodic check of the
-- coordinator's sweep, so that reconcile's counts need not list the bucket.
CREATE TABLE lost_archive_objects (
    key           text        PRIMARY KEY,
    tenant        text        NOT NULL,
    received_hour timestamptz NOT NULL,
    records       integer     NOT NULL,
    found_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX lost_archive_objects_hour ON lost_archive_objects (tenant, received_hour);

-- When the last check finished, and from which hour it looked.
CREATE TABLE archive_checks (
    id          boolean     PRIMARY KEY DEFAULT true CHECK (id),
    checked_at  timestamptz NOT NULL,
    since_hour  timestamptz NOT NULL
);
