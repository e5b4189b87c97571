"""LAP's live figures, exported through Ray's metrics (`ray.util.metrics`).

Ray's metrics agent on every node serves them in Prometheus format at
`http://<node>:<ray.metrics_port>/metrics`, each name prefixed `ray_`; the Ray
dashboard's Metrics view and any Prometheus that scrapes Ray show them. Each
process makes its metric objects on first use. Tags stay low in cardinality:
status codes, shard ids, stages and tenants, never learners or events.

These are for watching; the audit counters in Postgres stay the truth.
"""

from __future__ import annotations

from functools import cache

COMMIT_SECONDS_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]


@cache
def _metrics():
    # imported here: ray.util.metrics needs Ray, and the CLI and unit tests import LAP without it
    from ray.util import metrics

    return metrics


@cache
def ingest_events():
    return _metrics().Counter("lap_ingest_events", description="Events and entities /caliper accepted into the stream.")


@cache
def ingest_refusals():
    return _metrics().Counter("lap_ingest_refusals", description="/caliper requests refused, by HTTP status.",
                              tag_keys=("status",))


@cache
def putrecords_retries():
    return _metrics().Counter("lap_putrecords_retries",
                              description="Records PutRecords had to send again (throttled or failed).")


@cache
def dead_letters():
    return _metrics().Counter("lap_dead_letters", description="Stream records a shard consumer could not process "
                                                              "and kept aside (dead_letters in Postgres).",
                              tag_keys=("shard",))


@cache
def consumer_lag_ms():
    return _metrics().Gauge("lap_consumer_lag_ms", description="How far a shard's consumer is behind the stream's tip.",
                            tag_keys=("shard",))


@cache
def batch_commit_seconds():
    return _metrics().Histogram("lap_batch_commit_seconds",
                                description="Time of a batch's one Postgres transaction (aggregates, manifest, "
                                            "dedup, counters, checkpoint).",
                                boundaries=COMMIT_SECONDS_BOUNDARIES, tag_keys=("shard",))


@cache
def index_backlog_batches():
    return _metrics().Gauge("lap_index_backlog_batches",
                            description="Committed batches of a shard not yet in OpenSearch.", tag_keys=("shard",))


@cache
def reconcile_missing():
    return _metrics().Gauge("lap_reconcile_missing",
                            description="Events missing from a stage in the last settled hour (see the docs).",
                            tag_keys=("tenant", "stage"))


@cache
def reconcile_complete():
    return _metrics().Gauge("lap_reconcile_complete",
                            description="1 if the last settled hour reconciles complete for the tenant, else 0.",
                            tag_keys=("tenant",))
