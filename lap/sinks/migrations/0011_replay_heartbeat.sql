-- A running replay's heartbeat (written with its progress), and how many replicas have run it:
-- a replay whose heartbeat stops lost its OutputAPI replica, and another replica resumes it
-- (docs/decisions.md, "Replay").
ALTER TABLE replays ADD COLUMN heartbeat_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE replays ADD COLUMN attempts integer NOT NULL DEFAULT 1;
CREATE INDEX replays_running ON replays (heartbeat_at) WHERE status = 'running';
