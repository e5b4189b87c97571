"""LAP, the Learning Analytics Platform: auditable IMS Caliper ingest on Ray."""

__version__ = "0.1.0"
