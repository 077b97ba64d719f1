"""The worker's gRPC service: `Info` and the `Experts` stream, over a `ShardExperts`."""
from __future__ import annotations

import logging

from nextserve.proto import tensors
from nextserve.proto.v1 import experts_pb2, experts_pb2_grpc
from nextserve.telemetry.tracing import extract

from .batcher import LayerBatcher
from .shard import ShardExperts
from .telemetry import WorkerTelemetry

log = logging.getLogger("nextserve.worker")


class ExpertWorkerService(experts_pb2_grpc.ExpertWorkerServicer):
    def __init__(self, experts: ShardExperts, info: experts_pb2.InfoResponse, telemetry: WorkerTelemetry | None = None):
        self.experts = experts
        self.info = info
        self.telemetry = telemetry
        # Forwards run one at a time on the server's event loop (batcher.py): torch already spreads a
        # matmul over the cores, and one compute thread keeps requests from different routers from
        # thrashing each other's caches.
        self.batcher = LayerBatcher(experts.forward, telemetry.forward_done if telemetry is not None else None)
        self.requests_served = 0

    async def Info(self, request, context):
        return self.info

    async def Experts(self, request_iterator, context):
        async for request in request_iterator:
            yield await self._compute(request)

    async def _compute(self, request: experts_pb2.ExpertRequest) -> experts_pb2.ExpertResponse:
        # A bad request gets an error on its own response; the stream (shared by every request of
        # that router) stays open.
        try:
            hidden = tensors.from_wire(request.hidden)
            expert_ids = tensors.from_wire(request.expert_ids)
            weights = tensors.from_wire(request.weights)
            traced = self.telemetry is not None and self.telemetry.tracer is not None and request.trace_context
            out = await self.batcher.submit(request.layer, hidden, expert_ids, weights,
                                            extract(request.trace_context) if traced else None)
        except ValueError as e:
            log.warning("request %d (layer %d) rejected: %s", request.request_id, request.layer, e)
            if self.telemetry is not None:
                self.telemetry.request_errors.inc()
            return experts_pb2.ExpertResponse(request_id=request.request_id, error=str(e))
        self.requests_served += 1
        if self.telemetry is not None:
            self.telemetry.requests.inc()
        return experts_pb2.ExpertResponse(request_id=request.request_id, output=tensors.to_wire(out))
