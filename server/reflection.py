"""Server reflection in both versions clients ask for: `grpc.reflection.v1` (grpcurl,
Postman, buf curl ask it first) and `grpc.reflection.v1alpha` (older clients).

grpcio-reflection serves v1alpha only. v1's messages are v1alpha's under another package,
field for field, so one servicer answers both: v1's method is routed to it with
v1alpha's (wire-identical) message classes, and v1's file descriptor, made from
v1alpha's with the package renamed, is added to the descriptor pool so that clients
describing the reflection service itself find it.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1ALPHA_SERVICE = reflection.SERVICE_NAME
V1_SERVICE = "grpc.reflection.v1.ServerReflection"
_V1ALPHA_PACKAGE = "grpc.reflection.v1alpha"
_V1_PACKAGE = "grpc.reflection.v1"


def _v1_file() -> descriptor_pb2.FileDescriptorProto:
    """v1alpha's reflection.proto as v1's: the same messages and service in package grpc.reflection.v1."""
    v1 = descriptor_pb2.FileDescriptorProto.FromString(reflection_pb2.DESCRIPTOR.serialized_pb)
    v1.name = "grpc/reflection/v1/reflection.proto"
    v1.package = _V1_PACKAGE
    old, new = f".{_V1ALPHA_PACKAGE}.", f".{_V1_PACKAGE}."
    for message in v1.message_type:
        for field in message.field:
            if field.type_name.startswith(old):
                field.type_name = new + field.type_name.removeprefix(old)
    for method in v1.service[0].method:
        method.input_type = new + method.input_type.removeprefix(old)
        method.output_type = new + method.output_type.removeprefix(old)
    v1.options.Clear()
    return v1


def enable(service_names: Sequence[str], server: grpc.Server) -> None:
    """Serves reflection, v1 and v1alpha, listing `service_names` and both reflection services."""
    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(V1_SERVICE)
    except KeyError:
        pool.Add(_v1_file())
    servicer = reflection.ReflectionServicer((*service_names, V1_SERVICE, V1ALPHA_SERVICE))
    info = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": info})
            for name in (V1_SERVICE, V1ALPHA_SERVICE)
        ]
    )
