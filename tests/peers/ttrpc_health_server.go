// A real ttRPC peer for osbuilder's tests: containerd's Go ttrpc server (Debian's
// golang-github-containerd-ttrpc-dev) serving the grpc.Health service the Kata 2.x/3.x agent
// serves (Check, Version) on a Unix socket.
//
// Usage: ttrpc_health_server SOCKET [AGENT_VERSION]
// Prints "listening" on stdout once the socket accepts connections. Serves until killed.
// A connection whose Check request names the service "close-now" is closed without a reply
// (so tests can see how a client handles a peer that goes away mid-call).
package main

import (
	"context"
	"fmt"
	"net"
	"os"

	"github.com/containerd/ttrpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// The messages of the Kata agent's protocols/grpc/health.proto, by hand: field numbers in the tags.
type CheckRequest struct {
	Service string `protobuf:"bytes,1,opt,name=service,proto3"`
}

func (m *CheckRequest) Reset()         { *m = CheckRequest{} }
func (m *CheckRequest) String() string { return fmt.Sprintf("%+v", *m) }
func (*CheckRequest) ProtoMessage()    {}

type HealthCheckResponse struct {
	Status int32 `protobuf:"varint,1,opt,name=status,proto3"`
}

func (m *HealthCheckResponse) Reset()         { *m = HealthCheckResponse{} }
func (m *HealthCheckResponse) String() string { return fmt.Sprintf("%+v", *m) }
func (*HealthCheckResponse) ProtoMessage()    {}

type VersionCheckResponse struct {
	GrpcVersion  string `protobuf:"bytes,1,opt,name=grpc_version,json=grpcVersion,proto3"`
	AgentVersion string `protobuf:"bytes,2,opt,name=agent_version,json=agentVersion,proto3"`
}

func (m *VersionCheckResponse) Reset()         { *m = VersionCheckResponse{} }
func (m *VersionCheckResponse) String() string { return fmt.Sprintf("%+v", *m) }
func (*VersionCheckResponse) ProtoMessage()    {}

const serving = 1

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: ttrpc_health_server SOCKET [AGENT_VERSION]")
		os.Exit(2)
	}
	agentVersion := "ttrpc-health-server"
	if len(os.Args) > 2 {
		agentVersion = os.Args[2]
	}
	server, err := ttrpc.NewServer()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	server.Register("grpc.Health", map[string]ttrpc.Method{
		"Check": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req CheckRequest
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			if req.Service == "close-now" {
				os.Exit(3) // the peer vanishes in the middle of a call
			}
			if req.Service != "" {
				return nil, status.Errorf(codes.NotFound, "unknown service %q", req.Service)
			}
			return &HealthCheckResponse{Status: serving}, nil
		},
		"Version": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req CheckRequest
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			return &VersionCheckResponse{GrpcVersion: "0.0.1", AgentVersion: agentVersion}, nil
		},
	})
	listener, err := net.Listen("unix", os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println("listening")
	if err := server.Serve(context.Background(), listener); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
