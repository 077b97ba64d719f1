"""Prometheus metrics scraped by a real Prometheus server (Debian's `prometheus`, started on loopback)."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

from nextserve.client import Client

PROMETHEUS = shutil.which("prometheus")


class Prometheus:
    """A Prometheus server scraping `targets` ({job: "host:port"}) every second, its data in `directory`."""

    def __init__(self, directory, targets: dict[str, str], port: int):
        config = directory / "prometheus.yml"
        jobs = "".join(f"  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n"
                       for job, target in targets.items())
        config.write_text(f"global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n{jobs}")
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(directory / "prometheus.log", "wb")
        self.process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise TimeoutError(f"prometheus did not become ready: {self.log.name}")
            time.sleep(0.2)

    def query(self, promql: str) -> list[dict]:
        with urllib.request.urlopen(f"{self.url}/api/v1/query?query={urllib.parse.quote(promql)}", timeout=5) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def wait_value(self, promql: str, predicate, timeout: float = 30.0) -> float:
        deadline = time.monotonic() + timeout
        while True:
            value = self.value(promql)
            if value is not None and predicate(value):
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{promql} = {value} after {timeout} s")
            time.sleep(0.25)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.log.close()


def test_prometheus_scrapes_router_and_worker_and_the_series_move(helpers, servers, routers, tiny_checkpoint, tmp_path):
    from nextserve.telemetry.metrics_http import MetricsServer
    from nextserve.worker.server import build_service, serve

    assert PROMETHEUS is not None, "needs Debian's prometheus on PATH (`make test` installs it)"
    plan = helpers.contiguous_plan(tiny_checkpoint, 2)
    addresses, grpc_servers, metrics_servers = {}, [], []
    for shard in plan.shard_indices:
        service = build_service(tiny_checkpoint, plan, shard, "float32", "cpu")
        server, port = servers.run(serve(service, "127.0.0.1", 0))
        grpc_servers.append(server)
        metrics_servers.append(MetricsServer(service.telemetry.registry, "127.0.0.1", 0))
        addresses[shard] = [f"127.0.0.1:{port}"]
    router = routers(plan, addresses, metrics_port=0)
    prometheus = Prometheus(tmp_path, {"router": f"127.0.0.1:{router.metrics_port}",
                                       "worker": f"127.0.0.1:{metrics_servers[0].port}"}, helpers.free_port())
    try:
        prometheus.wait_ready()
        with Client(f"127.0.0.1:{router.port}") as client:
            for prompt in ([5, 6, 7], [9, 10]):
                client.generate(prompt, max_tokens=4, temperature=0, ignore_eos=True)
            prometheus.wait_value("nextserve_router_time_to_first_token_seconds_count", lambda v: v == 2)
            buckets = prometheus.query("nextserve_router_time_to_first_token_seconds_bucket")
            assert len(buckets) > 5 and max(float(b["value"][1]) for b in buckets) == 2  # le="+Inf" holds both
            assert prometheus.value('nextserve_router_requests_total{finish_reason="length"}') == 2
            assert prometheus.value("nextserve_router_prompt_tokens_total") == 5
            assert prometheus.value("nextserve_router_generation_tokens_total") == 8
            assert prometheus.value('nextserve_router_responses_total{code="OK"}') == 2
            assert prometheus.value("nextserve_router_inter_token_latency_seconds_count") == 6
            assert prometheus.value("sum(nextserve_router_shard_dispatch_seconds_count)") > 0
            # every token of a step is routed to k experts per MoE layer
            assert prometheus.value("sum(nextserve_router_expert_tokens_total)") > 0
            forwards = prometheus.wait_value('nextserve_worker_forwards_total{shard="0"}', lambda v: v > 0)
            worker_tokens = prometheus.value('nextserve_worker_tokens_total{shard="0"}')

            client.generate([11, 12, 13, 14], max_tokens=2, temperature=0, ignore_eos=True)
            prometheus.wait_value("nextserve_router_time_to_first_token_seconds_count", lambda v: v == 3)
            assert prometheus.value("nextserve_router_generation_tokens_total") == 10
            assert prometheus.value("nextserve_router_prompt_tokens_total") == 9
            prometheus.wait_value('nextserve_worker_forwards_total{shard="0"}', lambda v: v > forwards)
            assert prometheus.value('nextserve_worker_tokens_total{shard="0"}') > worker_tokens
            assert prometheus.value("nextserve_router_running_sequences") == 0
    finally:
        prometheus.stop()
        for m in metrics_servers:
            m.close()
        for server in grpc_servers:
            servers.run(server.stop(0))
