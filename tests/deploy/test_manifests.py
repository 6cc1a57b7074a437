"""``deploy/``: the Kubernetes manifests validate against the Kubernetes schemas (offline,
kubernetes-validate's bundled schemas) and agree with the server: probe paths, flags the
CLI accepts, a termination grace period that covers the drain, an HPA metric and Grafana
queries on names that ``/metrics`` really emits."""

from __future__ import annotations

import json
import re
from functools import partial

import httpx
import pytest
import trio
import yaml

from server.app import RUNTIME_CLOSE_TIMEOUT_S
from server.cli import build_parser, config_from_args
from server.probes import PROBES
from server.serve import run_server
from tests.server.launch import REPO

kubernetes_validate = pytest.importorskip("kubernetes_validate")

KUBERNETES = REPO / "deploy" / "kubernetes"
DASHBOARD = REPO / "deploy" / "grafana-dashboard.json"
KUBERNETES_VERSION = "1.30.0"
START_TIMEOUT_S = 120


def _documents() -> list[dict]:
    return [doc for path in sorted(KUBERNETES.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def _by_kind(kind: str) -> dict:
    (found,) = [doc for doc in _documents() if doc["kind"] == kind]
    return found


def test_every_manifest_validates_strictly():
    documents = _documents()
    assert {doc["kind"] for doc in documents} == {"Deployment", "Service", "HorizontalPodAutoscaler"}
    for doc in documents:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_validation_rejects_a_broken_manifest():
    broken = _by_kind("Deployment")
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/ready"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def _container() -> dict:
    return _by_kind("Deployment")["spec"]["template"]["spec"]["containers"][0]


def test_probes_use_the_servers_paths():
    container = _container()
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["startupProbe"]["httpGet"]["path"] == "/ready"
    assert {"/health", "/ready"} <= set(PROBES)
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # minutes for a model load


def test_args_parse_and_the_grace_period_covers_the_drain():
    """terminationGracePeriodSeconds >= drain grace + drain timeout + runtime close, so
    the kubelet's SIGKILL never cuts a drain that keeps to its flags."""
    container = _container()
    args = build_parser().parse_args(["serve", *container["args"]])
    config = config_from_args(args, {})
    assert config.drain_grace > 0
    period = _by_kind("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert period >= config.drain_grace + config.drain_timeout + RUNTIME_CLOSE_TIMEOUT_S
    assert container["ports"][0]["containerPort"] == 8000


def test_dockerfile_command_parses():
    text = (REPO / "Dockerfile").read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M)[1])
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M)[1])
    assert entry[:2] == ["vlserve", "serve"]
    config = config_from_args(build_parser().parse_args([*entry[1:], *cmd]), {})
    assert config.host == "0.0.0.0" and config.port == 8000 and config.drain_grace > 0


def _names_in(expr: str) -> set[str]:
    return set(re.findall(r"\b(vlserve[:_][a-z0-9_:]+)", expr))


async def _emitted_names(tiny_model, tiny_model_dir) -> set[str]:
    """Sample names on /metrics of the real runtime (tiny model) after one chat."""
    from prometheus_client.parser import text_string_to_metric_families

    from server.config import ServerConfig
    from server.runtime import open_runtime
    from vl.prep_config import PrepConfig

    config = ServerConfig(host="127.0.0.1", port=0, model=str(tiny_model_dir), prep=PrepConfig(processes=False))
    async with trio.open_nursery() as nursery:
        start = partial(run_server, config, runtime_factory=lambda c: open_runtime(c, loaded=tiny_model))
        server = await nursery.start(start)
        with trio.fail_after(START_TIMEOUT_S):
            await server.wait_ready()
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            assert (await http.post("/v1/chat/completions", json=body)).status_code == 200
            text = (await http.get("/metrics")).text
        server.shutdown()
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


async def test_hpa_and_dashboard_query_names_that_metrics_emits(tiny_model, tiny_model_dir):
    emitted = await _emitted_names(tiny_model, tiny_model_dir)
    hpa_metric = _by_kind("HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert hpa_metric in emitted
    dashboard = json.loads(DASHBOARD.read_text())
    queried = {name for panel in dashboard["panels"] for t in panel["targets"] for name in _names_in(t["expr"])}
    assert len(queried) >= 15
    assert queried <= emitted, sorted(queried - emitted)
