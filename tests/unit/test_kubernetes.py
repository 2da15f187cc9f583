"""The Kubernetes manifests (compose/kubernetes/, no cluster here): both overlays render (the kustomize subset
in tests/support/kustomize.py), every built-in resource validates against the Kubernetes schemas offline
(`kubernetes-validate`, schemas in its wheel), and what the schemas cannot say is checked: KEDA's
ScaledObjects (their fields, their target, their query against the metrics the collector exports, their
threshold against the worker's concurrency), the Prometheus scrape config and annotations, the Secret's keys,
the drain bound against the grace period, the settings and commands the containers use."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import fakeredis
import jsonschema
import kubernetes_validate
import pytest
import typer
import yaml
from prometheus_client.parser import text_string_to_metric_families

from arbiter.cli import app
from arbiter.metrics import render
from broker.app import all_queues
from broker.registry import REAL_BACKENDS
from broker.settings import Settings
from tests.support.kustomize import KustomizeError, build, merge
from tests.unit.test_metrics import KEYS, populate

K8S = Path(__file__).resolve().parents[2] / "compose" / "kubernetes"
OVERLAYS = ("cpu-sim", "nvidia")
SECRET_KEYS = {"redis-password", "flower-user", "flower-password", "gateway-url-secret"}
DRAIN_BOUND_S = Settings().drain_timeout_s      # a worker's SIGTERM drain bound (ARBITER_DRAIN_TIMEOUT_S)
WORKERS = {"llm-worker": "interactive", "llm-worker-batch": "batch", "diffusion-worker": "interactive",
           "diffusion-worker-batch": "batch"}

# What KEDA (keda.sh/v1alpha1) needs of a ScaledObject with a Prometheus trigger: its CRD has no schema in
# kubernetes-validate, so the fields these manifests rely on are spelled out here.
SCALED_OBJECT = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "minReplicaCount", "maxReplicaCount", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                                   "properties": {"name": {"type": "string"}, "kind": {"const": "Deployment"},
                                                  "apiVersion": {"const": "apps/v1"}}},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "advanced": {"type": "object"},
                "triggers": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["type", "metadata"],
                    "properties": {"type": {"const": "prometheus"}, "metadata": {
                        "type": "object", "required": ["serverAddress", "query", "threshold"],
                        "additionalProperties": {"type": "string"},      # KEDA's trigger metadata: strings
                        "properties": {"serverAddress": {"type": "string", "pattern": "^https?://"},
                                       "threshold": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
                                       "activationThreshold": {"type": "string",
                                                               "pattern": r"^[0-9]+(\.[0-9]+)?$"}}}}}},
            },
        },
    },
}


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, list[dict[str, Any]]]:
    return request.param, build(K8S / "overlays" / request.param)


def of(resources: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {r["metadata"]["name"]: r for r in resources if r["kind"] == kind}


def containers(resources: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for r in resources:
        if r["kind"] in ("Deployment", "StatefulSet"):
            out += [(r["metadata"]["name"], c) for c in r["spec"]["template"]["spec"]["containers"]]
    return out


def test_every_resource_validates_against_the_kubernetes_schemas(overlay):
    name, resources = overlay
    version = kubernetes_validate.latest_version()
    checked = 0
    for r in resources:
        if r["apiVersion"].startswith("keda.sh/"):
            continue                         # a CRD: checked against SCALED_OBJECT below
        try:
            kubernetes_validate.validate(r, version, strict=True)   # strict: no unknown field
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {r['kind']}/{r['metadata']['name']}: {exc.message}")
        checked += 1
    kinds = {r["kind"] for r in resources}
    assert {"Deployment", "StatefulSet", "Service", "PodDisruptionBudget", "ConfigMap"} <= kinds
    assert checked >= 25
    assert all(r["metadata"].get("namespace") == "arbiter" for r in resources if r["kind"] != "Namespace")


def test_the_validator_catches_a_broken_resource():
    bad = build(K8S / "overlays" / "cpu-sim")
    deployment = next(r for r in bad if r["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)


def test_every_worker_pool_scales_on_arbiters_backlog_metrics(overlay):
    _name, resources = overlay
    scaled = of(resources, "ScaledObject")
    deployments = of(resources, "Deployment")
    services = of(resources, "Service")
    assert set(scaled) == set(WORKERS)
    exported = scrape_labels()
    bands = {q.split(".", 1)[1] for q in all_queues()}
    for so_name, so in scaled.items():
        jsonschema.validate(so, SCALED_OBJECT)
        spec = so["spec"]
        target = deployments[spec["scaleTargetRef"]["name"]]        # the Deployment exists
        assert target["metadata"]["name"] == so_name
        pool = WORKERS[so_name]
        # interactive capacity never goes below one replica; batch capacity starts from zero
        assert spec["minReplicaCount"] == (1 if pool == "interactive" else 0)
        assert spec["maxReplicaCount"] > spec["minReplicaCount"]
        (trigger,) = spec["triggers"]
        meta = trigger["metadata"]
        assert meta["activationThreshold"] == "0"
        # the server is the Prometheus Service the manifests ship, on its port
        url = urlparse(meta["serverAddress"])
        assert url.hostname in services and url.port in {p["port"] for p in services[url.hostname]["spec"]["ports"]}
        # one replica per `threshold` jobs: the worker's --concurrency (1 for a real backend but openai's:
        # `arbiter worker` refuses more, a model copy per process)
        args = container(target)["args"]
        assert meta["threshold"] == args[args.index("--concurrency") + 1]
        if args[args.index("--backend") + 1] in set(REAL_BACKENDS) - {"openai"}:
            assert args[args.index("--concurrency") + 1] == "1", (so_name, args)
        # the query reads metrics the collector exports, with labels it sets, for this workload's bands
        workload = args[args.index("--workload") + 1]
        metrics = set(re.findall(r"\b(arbiter_[a-z_]+)\{", meta["query"]))
        assert metrics == {"arbiter_jobs_waiting", "arbiter_jobs_running"}
        for m in metrics:
            assert {"workload", "band"} <= exported[m]
        assert set(re.findall(r'workload="([a-z]+)"', meta["query"])) == {workload}
        asked = {b for group in re.findall(r'band=~"([a-z|]+)"', meta["query"]) for b in group.split("|")}
        assert asked <= bands and asked == ({"interactive"} if pool == "interactive" else {"standard", "background"})
        assert "max by (band)" in meta["query"]      # beat and gateway both export it: never added twice


def scrape_labels() -> dict[str, set[str]]:
    """metric family -> the labels its samples carry, from the collector on a populated Redis."""
    r = fakeredis.FakeRedis()
    populate(r)
    return {f.name: {k for s in f.samples for k in s.labels} for f in text_string_to_metric_families(render(r, KEYS).decode())}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def test_workers_drain_within_their_grace_period_and_a_drain_takes_one_at_a_time(overlay):
    _, resources = overlay
    deployments, pdbs = of(resources, "Deployment"), of(resources, "PodDisruptionBudget")
    for name in WORKERS:
        pod = deployments[name]["spec"]["template"]
        # the kubelet waits this long after SIGTERM before SIGKILL: three times the worker's drain bound
        assert pod["spec"]["terminationGracePeriodSeconds"] >= 3 * DRAIN_BOUND_S
        env = {e["name"]: e for e in container(deployments[name])["env"]}
        assert env["ARBITER_NODE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"   # own GPU id
        assert "replicas" not in deployments[name]["spec"]            # KEDA owns the count
        assert selects(pdbs[name], pod) and pdbs[name]["spec"]["maxUnavailable"] == 1
    for name in ("beat", "gateway"):
        assert selects(pdbs[name], deployments[name]["spec"]["template"]) and pdbs[name]["spec"]["minAvailable"] == 1
    assert deployments["beat"]["spec"]["replicas"] == 2
    assert selects(pdbs["redis"], of(resources, "StatefulSet")["redis"]["spec"]["template"])


def selects(pdb: dict[str, Any], template: dict[str, Any]) -> bool:
    labels = template["metadata"]["labels"]
    return all(labels.get(k) == v for k, v in pdb["spec"]["selector"]["matchLabels"].items())


def test_prometheus_scrapes_services_that_serve_metrics(overlay):
    _, resources = overlay
    services, deployments = of(resources, "Service"), of(resources, "Deployment")
    config = yaml.safe_load(of(resources, "ConfigMap")["prometheus"]["data"]["prometheus.yml"])
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert set(targets) == {"beat:9464", "gateway:8000"}
    for t in targets:
        host, port = t.split(":")
        assert int(port) in {p["port"] for p in services[host]["spec"]["ports"]}, t
    annotated = {n: d for n, d in deployments.items()
                 if d["spec"]["template"]["metadata"].get("annotations", {}).get("prometheus.io/scrape") == "true"}
    assert set(annotated) == {"beat", "gateway"}
    for d in annotated.values():
        ann = d["spec"]["template"]["metadata"]["annotations"]
        c = container(d)
        assert int(ann["prometheus.io/port"]) in {p["containerPort"] for p in c["ports"]}
        assert ann["prometheus.io/path"] == "/metrics"
    beat_env = {e["name"]: e.get("value") for e in container(deployments["beat"])["env"]}
    assert beat_env["ARBITER_METRICS_PORT"] == "9464"
    gateway_app = (Path(__file__).resolve().parents[2] / "arbiter" / "gateway" / "app.py").read_text()
    assert '@app.get("/metrics"' in gateway_app and '@app.get("/healthz"' in gateway_app
    gateway = container(deployments["gateway"])
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/healthz"


def test_secrets_hold_what_the_containers_ask_for(overlay):
    name, resources = overlay
    refs = set()
    for _, c in containers(resources):
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == "arbiter-secrets", e
                refs.add(ref["key"])
            if re.search(r"PASSWORD|SECRET|AUTH", e["name"]) and "value" in e:   # never a literal credential
                assert re.fullmatch(r"(\$\([A-Z_]+\):?)+", e["value"]), (c["name"], e["name"])
    assert refs == SECRET_KEYS
    secrets = of(resources, "Secret")
    if name == "cpu-sim":        # a laptop's development Secret; a real cluster makes its own (compose/README.md)
        assert set(secrets["arbiter-secrets"]["stringData"]) == SECRET_KEYS
    else:
        assert not secrets
    readme = (K8S.parent / "README.md").read_text()
    assert all(k in readme for k in SECRET_KEYS)


def test_every_arbiter_env_name_is_a_setting_and_every_command_parses(overlay):
    _, resources = overlay
    fields = set(Settings.model_fields)
    names = set(of(resources, "ConfigMap")["arbiter-config"]["data"])
    commands = typer.main.get_command(app).commands
    for _, c in containers(resources):
        names |= {e["name"] for e in c.get("env", []) if e["name"].startswith("ARBITER_")}
        if c["image"].startswith("arbiter") and "command" not in c:      # the image's entrypoint: `arbiter`
            sub, *args = c["args"]
            commands[sub].make_context(sub, list(args))                   # click parses, without running
        for e in c.get("env", []):
            for ref in re.findall(r"\$\(([A-Z_]+)\)", e.get("value") or ""):   # defined before it is used
                before = [x["name"] for x in c["env"][: c["env"].index(e)]]
                assert ref in before, (c["name"], e["name"], ref)
    unknown = sorted(n for n in names if n[len("ARBITER_"):].lower() not in fields)
    assert not unknown, f"not fields of broker.settings.Settings: {unknown}"
    assert {"ARBITER_REDIS_URL", "ARBITER_REDIS_MASTER_NAME", "ARBITER_GATEWAY_URL_SECRET", "ARBITER_NODE"} <= names


def test_every_arbiter_process_reaches_redis_through_the_sentinels(overlay):
    _, resources = overlay
    redis = of(resources, "StatefulSet")["redis"]
    assert redis["spec"]["replicas"] == 3
    assert {c["name"] for c in redis["spec"]["template"]["spec"]["containers"]} == {"redis", "sentinel"}
    scripts = of(resources, "ConfigMap")["redis-scripts"]["data"]
    assert "sentinel monitor arbiter" in scripts["sentinel.sh"] and "--appendonly yes" in scripts["redis.sh"]
    assert of(resources, "ConfigMap")["arbiter-config"]["data"]["ARBITER_REDIS_MASTER_NAME"] == "arbiter"
    for owner, c in containers(resources):
        if owner in ("redis", "prometheus"):
            continue
        url = {e["name"]: e.get("value") for e in c["env"]}["ARBITER_REDIS_URL"]
        hosts = re.findall(r"sentinel://(?::\$\(REDIS_PASSWORD\)@)?([a-z0-9.-]+):26379", url)
        assert hosts == ["redis-0.redis", "redis-1.redis", "redis-2.redis"], (owner, url)


def test_the_nvidia_overlay_puts_each_pool_on_its_own_kind_of_gpu():
    resources = build(K8S / "overlays" / "nvidia")
    deployments = of(resources, "Deployment")
    kinds = {}
    for name in WORKERS:
        pod = deployments[name]["spec"]["template"]["spec"]
        c = container(deployments[name])
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and c["resources"]["requests"]["nvidia.com/gpu"] == 1
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        kinds[name] = pod["nodeSelector"]["nvidia.com/gpu.product"]
        args = c["args"]
        assert args[args.index("--backend") + 1] in ("transformers", "diffusers") and args[args.index("--gpu") + 1] == "0"
        assert any(m["mountPath"] == "/models" for m in c["volumeMounts"])
    assert kinds["llm-worker"] != kinds["llm-worker-batch"]
    sim = of(build(K8S / "overlays" / "cpu-sim"), "Deployment")
    for name in WORKERS:
        args = container(sim[name])["args"]
        assert args[args.index("--backend") + 1] == "sim" and "nvidia.com/gpu" not in str(container(sim[name]))


def test_the_renderer_merges_as_kubernetes_strategic_merge_does(tmp_path):
    base = {"spec": {"containers": [{"name": "a", "args": ["x", "y"], "env": [{"name": "E", "value": "1"}],
                                     "volumeMounts": [{"name": "v", "mountPath": "/v"}]}],
                     "tolerations": [{"key": "t"}]}}
    patch = {"spec": {"containers": [{"name": "a", "args": ["z"], "env": [{"name": "F", "value": "2"}],
                                      "volumeMounts": [{"name": "w", "mountPath": "/w"}]}],
                      "tolerations": [{"key": "u"}]}}
    got = merge(base, patch)["spec"]
    assert got["containers"][0]["args"] == ["z"]                          # lists without a merge key: replaced
    assert [e["name"] for e in got["containers"][0]["env"]] == ["E", "F"]   # merged on name
    assert [m["mountPath"] for m in got["containers"][0]["volumeMounts"]] == ["/v", "/w"]
    assert got["tolerations"] == [{"key": "u"}]
    (tmp_path / "kustomization.yaml").write_text("resources: []\nconfigMapGenerator: []\n")
    with pytest.raises(KustomizeError, match="configMapGenerator"):
        build(tmp_path)                                                  # a feature it lacks is refused
