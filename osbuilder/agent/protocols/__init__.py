"""Host-side clients for the guest agents' own protocols, beside osbuilder's JSON lines (client.py).

One module per concern, each layer talking to the one below through `transport.ByteStream`:

    transport.py    deadline-bounded byte streams; a connected Unix (or vsock) socket is one
    yamux.py        a yamux client session; each of its streams is a ByteStream too
    protobuf.py     the protobuf wire format, just enough for the messages below
    health.py       the grpc.Health messages (CheckRequest, HealthCheckResponse, VersionCheckResponse)
    grpc.py         one unary gRPC call at a time over HTTP/2 (the h2 library) on any ByteStream
    ttrpc.py        containerd's ttRPC framing and calls (Kata 2.x/3.x, vsock port 1024)
    kata1.py        Kata 1.x: yamux on agent.channel.0, gRPC on a yamux stream
    hyperstart.py   Clear Containers 3.x: hyperstart frames on sh.hyper.channel.0/.1
    errors.py       the errors every client raises (subclasses of client.py's AgentError family)

Every read has a deadline; every length a peer sends is bounded before anything is buffered.
"""
