-- The node each shard's consumer runs on, for the console's placement view (written by the audit actor).
ALTER TABLE shard_status ADD COLUMN consumer_node text;
