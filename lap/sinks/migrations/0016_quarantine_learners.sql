-- Which IRIs each kept refusal names: 32-bit hashes (lap.sinks.archive.learner_hash32) of the strings of its
-- payload that hold a ':', so that an erasure reads only the refusals that may name the learner. NULL when the
-- payload is not JSON, was cut at the quarantine's cap, or names too many: an erasure reads those.
ALTER TABLE quarantined ADD COLUMN learners integer[];
