"""The Prometheus metrics of the sidecar and the in-memory board of latest usage they read."""
