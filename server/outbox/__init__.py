"""The readers of the usage-event outbox: the live WatchUsageEvents feed and webhook delivery."""
