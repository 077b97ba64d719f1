"""`nextserve operator`: run the Kubernetes operator for Qwen3NextDeployment resources."""
from __future__ import annotations


def add_parser(sub) -> None:
    # Registering the flags does not import kopf, so `nextserve --help` stays quick.
    from nextserve.operator.main import add_arguments, run_parsed
    p = sub.add_parser("operator", help="run the Kubernetes operator (current kubeconfig or in-cluster)",
                       description="Reconcile Qwen3NextDeployment resources into expert workers and routers, "
                                   "using the current kubeconfig or the in-cluster service account. Run by "
                                   "hand it works alone; replicas share one --peering object.")
    add_arguments(p)
    p.set_defaults(func=run_parsed)
