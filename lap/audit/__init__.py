"""The audit trail: receipts of accepted events, stage counters, reconcile and replay."""
