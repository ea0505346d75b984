"""The generated messages (`quota_pb2`) and gRPC stubs (`quota_pb2_grpc`) of the
protobuf package quota.v1; protos/generate.py writes them, never a hand."""
