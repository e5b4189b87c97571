"""Local stand-ins for AWS, OpenSearch and Postgres, started by `lap up`."""
