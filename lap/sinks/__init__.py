"""Where events end up: the S3 archive, the OpenSearch index and the Postgres store."""
