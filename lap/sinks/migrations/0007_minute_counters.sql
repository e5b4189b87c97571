-- The audit counters by the minute instead of the hour, so that reconcile reads counters for
-- every whole minute of a window and looks at single events only in the partial minutes at
-- its edges (at 10K events/s a partial hour held up to 36M events; a minute holds 600K).
-- Rows written before this migration keep the hour's start as their minute.
ALTER TABLE stage_counts RENAME COLUMN received_hour TO received_minute;
