"""Stream processing: shard consumers, aggregation, indexing."""
