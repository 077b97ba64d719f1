"""gRPC health service names: what the router and workers report, what the Kubernetes probes ask.

One place for the contract between the servers (router/server.py, worker/server.py) and the pod
specs the operator builds (operator/manifests.py). Plain strings, no imports: the operator image
has no grpc.
"""

# SERVING for as long as the process runs: the liveness probe restarts only a wedged process,
# never one that waits for a worker or drains.
LIVENESS = "liveness"
# SERVING while the router can serve (every expert reachable) and is not draining; "" reports the same.
ROUTER_READINESS = "nextserve.v1.Serving"
# SERVING while the worker's experts are loaded and it is not shutting down; "" reports the same.
WORKER_READINESS = "nextserve.v1.ExpertWorker"
