"""The generated quota.v1 messages and stubs, as the client has long offered them.

They live in `quota_sidecar.api.v1`; this package re-exports those same modules, so
`from quota_sidecar.client.v1 import quota_pb2` and `import quota_sidecar.client.v1.quota_pb2`
keep working and yield the very classes the client and the server use.
"""

import sys

from quota_sidecar.api.v1 import quota_pb2, quota_pb2_grpc

# Registered as submodules too, so the dotted import of either name finds the one module.
sys.modules[f"{__name__}.quota_pb2"] = quota_pb2
sys.modules[f"{__name__}.quota_pb2_grpc"] = quota_pb2_grpc

__all__ = ["quota_pb2", "quota_pb2_grpc"]
