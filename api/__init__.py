"""The contract both sides of the quota sidecar speak: the generated quota.v1 stubs
(`quota_sidecar.api.v1`, from protos/ by protos/generate.py) and the credential files
its command-line tools share (`quota_sidecar.api.credentials`).

The server and the client each import this package and never each other.
"""
