"""The front door: the IngestAPI Serve deployment, auth and the producer."""
