"""The errors every protocol client raises: the same family as osbuilder's own agent client, so a
caller that handles `AgentError`, `AgentTimeout` and `AgentConnectionClosed` handles these too.

    ProtocolError       the peer broke the protocol (malformed or oversized frame, wrong version,
                        an error status); `str()` is one line naming what was wrong
    ProtocolTimeout     no (complete) answer before the deadline
    ProtocolClosed      the byte stream, the session or the stream was closed or reset by the peer
    RemoteError         the peer answered with an error status (gRPC, ttRPC, hyperstart ERROR):
                        `.code` and `.message` hold what it said
"""

from __future__ import annotations

from osbuilder.agent.client import AgentConnectionClosed, AgentError, AgentTimeout


class ProtocolError(AgentError):
    """The peer broke the protocol, or answered with an error."""


class ProtocolTimeout(ProtocolError, AgentTimeout):
    """No complete answer before the deadline."""


class ProtocolClosed(ProtocolError, AgentConnectionClosed):
    """The connection, session or stream was closed or reset."""


class RemoteError(ProtocolError):
    """The peer answered the call with an error status (`code`, `message`)."""

    def __init__(self, what: str, code: int | str, message: str) -> None:
        super().__init__(f"{what}: {code}: {message}" if message else f"{what}: {code}")
        self.code = code
        self.message = message
