"""The quota sidecar: the gRPC service, its decision engine and its ledger."""

__version__ = "0.1.0"
