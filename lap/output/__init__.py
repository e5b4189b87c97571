"""The OutputAPI Serve deployment: insights, search and audit routes."""
