"""The gRPC layer: the servicers, the conversion of contract messages to domain values, and
the mapping of the error hierarchy to status codes."""
