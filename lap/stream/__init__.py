"""Kinesis access: the stream, its shards, puts and reads."""
