"""What router, workers and the client share for observability: OpenTelemetry set-up from the
standard OTEL_* variables, W3C trace context over gRPC, the span attribute names, and the
Prometheus /metrics HTTP endpoint. Each component's own metrics and spans live beside it
(`nextserve.router.telemetry`, `nextserve.worker.telemetry`)."""
