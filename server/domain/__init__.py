"""The domain: plans and their validation, billing cycles, figures, notices, presets and
the one error hierarchy. Plain values and rules, importing nothing of gRPC or storage."""
