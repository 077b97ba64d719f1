"""The gRPC protocol of nextserve: .proto sources under nextserve/v1/, Python stubs in v1/."""
