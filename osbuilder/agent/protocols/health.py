"""The grpc.Health service of the Kata agents (1.x over gRPC, 2.x/3.x over ttRPC), from the Kata
agent's protocols/grpc/health.proto (package `grpc`):

    message CheckRequest         { string service = 1; }
    message HealthCheckResponse  { ServingStatus status = 1; }   // UNKNOWN 0, SERVING 1, NOT_SERVING 2
    message VersionCheckResponse { string grpc_version = 1; string agent_version = 2; }
    service Health { rpc Check(CheckRequest) returns (HealthCheckResponse);
                     rpc Version(CheckRequest) returns (VersionCheckResponse); }
"""

from __future__ import annotations

from osbuilder.agent.protocols import protobuf

SERVICE = "grpc.Health"
CHECK = "Check"
VERSION = "Version"
SERVING_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING"}
SERVING = "SERVING"


def grpc_path(method: str) -> str:
    """The HTTP/2 :path of a gRPC method: /grpc.Health/Check."""
    return f"/{SERVICE}/{method}"


def check_request(service: str = "") -> bytes:
    return protobuf.bytes_field(1, service)


def serving_status(response: bytes) -> str:
    """HealthCheckResponse -> "SERVING", "NOT_SERVING", "UNKNOWN" (or "status N" for another value)."""
    code = protobuf.Message(response).varint(1)
    return SERVING_STATUS.get(code, f"status {code}")


def versions(response: bytes) -> tuple[str, str]:
    """VersionCheckResponse -> (grpc_version, agent_version)."""
    msg = protobuf.Message(response)
    return msg.string(1), msg.string(2)
