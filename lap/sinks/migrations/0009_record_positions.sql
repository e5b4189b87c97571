-- A stream record holds many events (docs/stream-records.md): an event is found by its
-- record's shard and sequence number plus its position inside the record. Records of
-- format 0 hold one event, at position 0.
ALTER TABLE receipts ADD COLUMN position integer NOT NULL DEFAULT 0;
ALTER TABLE seen_events ADD COLUMN position integer NOT NULL DEFAULT 0;
