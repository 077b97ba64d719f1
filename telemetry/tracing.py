"""OpenTelemetry tracing set-up from the standard OTEL_* variables, and W3C trace context over gRPC.

Tracing is off unless an OTLP endpoint is given (a flag, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
`OTEL_EXPORTER_OTLP_ENDPOINT`). Off means `setup_tracing` returns None: no provider, no exporter,
no export thread, and callers skip building spans altogether.

Each component gets its own TracerProvider instead of the global one, so a router and workers in
one process (tests, `nextserve up` in the future) keep their own service names, and nothing of the
caller's global OpenTelemetry set-up is touched.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, MutableMapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

# Only W3C trace context crosses process boundaries: traceparent + tracestate.
_PROPAGATOR = TraceContextTextMapPropagator()

SAMPLERS = ("always_on", "always_off", "traceidratio", "parentbased_always_on", "parentbased_always_off",
            "parentbased_traceidratio")


class Tracing:
    """A component's tracer and the provider behind it; `shutdown()` flushes the spans not yet sent."""

    def __init__(self, provider, tracer: trace.Tracer):
        self.provider, self.tracer = provider, tracer

    def shutdown(self) -> None:
        self.provider.shutdown()


def otlp_endpoint_from_env(environ: Mapping[str, str]) -> str | None:
    return environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None


def tracing_enabled(otlp_endpoint: str | None, environ: Mapping[str, str] | None = None) -> bool:
    """Whether `setup_tracing` would export; raises ValueError for OTEL_* values nextserve cannot honour."""
    environ = os.environ if environ is None else environ
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    if exporter == "none":
        return False
    if exporter != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER={exporter!r}: nextserve exports traces with otlp (or none)")
    protocol = (environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "grpc").strip().lower()
    if protocol != "grpc":
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: nextserve exports OTLP over grpc; point it "
                         "at the collector's gRPC port (4317)")
    sampler = environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    if sampler not in SAMPLERS:
        raise ValueError(f"OTEL_TRACES_SAMPLER={sampler!r}: expected one of {', '.join(SAMPLERS)}")
    return bool(otlp_endpoint or otlp_endpoint_from_env(environ))


def make_sampler(sample_ratio: float | None, environ: Mapping[str, str]):
    """--trace-sample-ratio wins (parent-based, so a traced caller is always followed); else OTEL_TRACES_SAMPLER(_ARG)."""
    from opentelemetry.sdk.trace import sampling

    if sample_ratio is not None:
        if not 0.0 <= sample_ratio <= 1.0:
            raise ValueError(f"the trace sample ratio must be in [0, 1], got {sample_ratio}")
        return sampling.ParentBased(sampling.TraceIdRatioBased(sample_ratio))
    name = environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    arg = environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0")
    if name.endswith("traceidratio"):
        try:
            ratio = float(arg)
        except ValueError:
            raise ValueError(f"OTEL_TRACES_SAMPLER_ARG={arg!r}: expected a ratio in [0, 1]") from None
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"OTEL_TRACES_SAMPLER_ARG={arg!r}: expected a ratio in [0, 1]")
        root = sampling.TraceIdRatioBased(ratio)
    else:
        root = sampling.ALWAYS_OFF if name.endswith("always_off") else sampling.ALWAYS_ON
    return sampling.ParentBased(root) if name.startswith("parentbased_") else root


def setup_tracing(default_service_name: str, otlp_endpoint: str | None = None, sample_ratio: float | None = None,
                  resource_attributes: Mapping[str, str | int] | None = None) -> Tracing | None:
    """The component's Tracing, or None when tracing is off (see the module docstring).

    `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` win over `default_service_name` and
    `resource_attributes`; the exporter reads the rest of `OTEL_EXPORTER_OTLP_*` (headers, timeout,
    certificates, insecure) itself. Raises ValueError for settings it cannot honour."""
    if not tracing_enabled(otlp_endpoint, os.environ):
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    endpoint = otlp_endpoint or otlp_endpoint_from_env(os.environ)
    from_env = OTELResourceDetector().detect().attributes  # OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME
    resource = Resource.create({"service.name": default_service_name, **(resource_attributes or {}), **from_env})
    provider = TracerProvider(resource=resource, sampler=make_sampler(sample_ratio, os.environ))
    # insecure follows the URL scheme (http:// plain, https:// TLS) unless OTEL_EXPORTER_OTLP_INSECURE says otherwise.
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return Tracing(provider, provider.get_tracer(default_service_name))


# -- W3C trace context ------------------------------------------------------------------------------

def inject(context: Context | None, carrier: MutableMapping[str, str]) -> None:
    """Write traceparent (and tracestate) of `context` into `carrier` (a dict or a proto map)."""
    _PROPAGATOR.inject(carrier, context=context)


def extract(carrier: Mapping[str, str]) -> Context | None:
    """The remote span context in `carrier`, or None when it has none (or an invalid one)."""
    if not carrier or "traceparent" not in carrier:
        return None
    context = _PROPAGATOR.extract(carrier)
    return context if trace.get_current_span(context).get_span_context().is_valid else None


def grpc_metadata(context: Context | None = None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying `context` (default: the current one); empty when there is no valid span."""
    carrier: dict[str, str] = {}
    inject(context, carrier)
    return tuple(carrier.items())


def context_from_grpc_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> Context | None:
    """The caller's span context from a server call's invocation metadata, or None."""
    carrier = {key: value for key, value in (metadata or ()) if key in ("traceparent", "tracestate")
               and isinstance(value, str)}
    return extract(carrier)
