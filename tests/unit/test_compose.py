"""The deployment files in compose/ (no Docker engine here): every command, env name, metric and target
they use must exist in the code."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import typer
import yaml
from prometheus_client.parser import text_string_to_metric_families

from arbiter.cli import app
from arbiter.metrics import render
from broker.settings import Settings
from tests.unit.test_metrics import KEYS, populate

COMPOSE = Path(__file__).resolve().parents[2] / "compose"
GPU_WORKERS = ("llm-worker", "diffusion-worker")
CPU_WORKERS = ("llm-worker-cpu", "diffusion-worker-cpu")
REDIS_URL = re.compile(r"^redis://:\$\{REDIS_PASSWORD(:\?[^}]*)?\}@redis:6379/0$")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict]:
    return compose["services"]


def argv(svc: dict) -> list[str]:
    """What the container runs: entrypoint + command (the image's entrypoint is `arbiter`)."""
    entry = svc.get("entrypoint", ["arbiter"] if "build" in svc else [])
    entry = entry.split() if isinstance(entry, str) else list(entry)
    cmd = svc.get("command", [])
    return entry + (cmd.split() if isinstance(cmd, str) else list(cmd))


def arbiter_services(services: dict) -> dict[str, dict]:
    return {n: s for n, s in services.items() if argv(s)[:1] == ["arbiter"]}


def env_of(svc: dict) -> dict[str, str]:
    env = svc.get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return env


def test_every_service_has_an_image_or_build(services):
    expected = {"redis", "beat", "gateway", "flower", "prometheus", "grafana", *GPU_WORKERS, *CPU_WORKERS}
    assert expected <= set(services)
    for name, svc in services.items():
        assert svc.get("image") or svc.get("build"), name


def test_every_arbiter_command_is_a_real_subcommand_with_valid_options(services):
    commands = typer.main.get_command(app).commands
    used = arbiter_services(services)
    assert {"beat", "gateway", *GPU_WORKERS, *CPU_WORKERS} <= set(used)
    for name, svc in used.items():
        sub, *args = argv(svc)[1:]
        if sub == "gateway" and sub not in commands:
            continue   # `arbiter gateway` is being added in parallel; check it once it exists
        assert sub in commands, f"{name}: `arbiter {sub}` is not a command"
        # click parses (and type-checks) the options without running the command
        commands[sub].make_context(sub, list(args))


def test_flower_runs_celery_on_the_workers_app_with_auth(services):
    cmd = argv(services["flower"])
    assert cmd[:3] == ["celery", "-A", "arbiter.flower_app"] and "flower" in cmd   # stock transport
    assert importlib.util.find_spec("arbiter.flower_app") is not None
    assert not any("basic-auth" in a or "PASSWORD" in a for a in cmd)      # nothing secret in `ps`
    auth = services["flower"]["environment"]["FLOWER_BASIC_AUTH"]
    assert auth.startswith("${FLOWER_USER") and "${FLOWER_PASSWORD" in auth
    assert "--port=5555" in cmd


def test_every_arbiter_env_name_is_a_setting(services):
    fields = set(Settings.model_fields)
    text = "\n".join((COMPOSE / f).read_text() for f in ("docker-compose.yml", ".env.example", "Dockerfile"))
    names = set(re.findall(r"\bARBITER_[A-Z0-9_]+\b", text))
    for svc in services.values():
        names |= {k for k in env_of(svc) if k.startswith("ARBITER_")}
    assert {"ARBITER_REDIS_URL", "ARBITER_METRICS_PORT"} <= names
    unknown = sorted(n for n in names if n[len("ARBITER_"):].lower() not in fields)
    assert not unknown, f"not fields of broker.settings.Settings: {unknown}"


def test_every_arbiter_container_reaches_redis_with_the_password(services):
    for name in [*arbiter_services(services), "flower"]:
        url = env_of(services[name]).get("ARBITER_REDIS_URL", "")
        assert REDIS_URL.match(url), f"{name}: {url!r}"
    assert env_of(services["beat"])["ARBITER_METRICS_PORT"] == "9464"


def test_redis_is_durable_and_password_protected(services):
    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    cmd = " ".join(argv(redis))
    assert "--appendonly yes" in cmd and "--appendfsync everysec" in cmd
    assert re.search(r"--requirepass \$\{REDIS_PASSWORD", cmd)
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert redis["healthcheck"]["test"]
    for name in arbiter_services(services):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy", name


def test_gpu_workers_reserve_a_gpu_and_run_real_backends(services):
    for name in GPU_WORKERS:
        svc = services[name]
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] and d.get("count", 1) >= 1
                   for d in devices), name
        cmd = argv(svc)
        assert cmd[cmd.index("--backend") + 1] in ("transformers", "diffusers")
        assert cmd[cmd.index("--models") + 1] == "/models/models.toml"
        assert cmd[cmd.index("--gpu") + 1] == "0"
        assert any(":/models:" in v or v.endswith(":/models") for v in svc["volumes"])
        assert "llm" in svc["build"]["args"]["EXTRAS"] and "diffusion" in svc["build"]["args"]["EXTRAS"]


def test_the_cpu_profile_runs_the_sim_backend(services):
    assert {n for n, s in services.items() if "cpu" in s.get("profiles", [])} == set(CPU_WORKERS)
    for name in CPU_WORKERS:
        cmd = argv(services[name])
        assert cmd[cmd.index("--backend") + 1] == "sim"
        assert cmd[cmd.index("--gpu") + 1].startswith("sim:")
        assert "deploy" not in services[name]
    # workers sharing one GPU must agree on the node name (the GPU id is <node>:<device>)
    nodes = {env_of(services[n]).get("ARBITER_NODE") for n in (*GPU_WORKERS, *CPU_WORKERS)}
    assert len(nodes) == 1 and None not in nodes


def test_host_files_the_services_mount_exist(services):
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("./") and "models" not in src:
                assert (COMPOSE / src).exists(), f"{name}: {src}"


def test_required_variables_are_in_the_env_example(compose):
    text = (COMPOSE / "docker-compose.yml").read_text()
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", text)) | {"FLOWER_USER"}
    example = {line.partition("=")[0] for line in (COMPOSE / ".env.example").read_text().splitlines()
               if line and not line.startswith("#")}
    assert {"REDIS_PASSWORD", "FLOWER_USER", "FLOWER_PASSWORD", "GRAFANA_PASSWORD"} <= example
    assert required <= example


def test_dockerfile(services):
    text = (COMPOSE / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.MULTILINE)
    assert re.search(r"^ARG EXTRAS=", text, re.MULTILINE)
    assert "https://download.pytorch.org/whl/cpu" in text
    assert re.search(r'^ENTRYPOINT \["arbiter"\]', text, re.MULTILINE)
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    for name, svc in services.items():
        if "build" in svc:
            assert svc["build"]["dockerfile"] == "compose/Dockerfile"
            assert (COMPOSE / svc["build"]["context"] / "pyproject.toml").exists(), name


def scrape_targets() -> list[str]:
    prom = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    return [t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]


def test_prometheus_scrapes_services_that_exist(services):
    targets = scrape_targets()
    assert "beat:9464" in targets and "gateway:8000" in targets
    for t in targets:
        host = t.partition(":")[0]
        assert host == "localhost" or host in services, t
    gateway = argv(services["gateway"])
    assert gateway[gateway.index("--port") + 1] == "8000"
    prom = services["prometheus"]
    assert any(v.startswith("./prometheus.yml:/etc/prometheus/prometheus.yml") for v in prom["volumes"])


@pytest.fixture(scope="module")
def exported() -> set[str]:
    """Every sample name the collector renders on a populated Redis."""
    import fakeredis

    r = fakeredis.FakeRedis()
    populate(r)
    # every counter the stats hash can carry, so the dashboard may use any of them
    from arbiter.metric_families import COUNTERS
    from broker.stats import add

    add(r, KEYS, **dict.fromkeys(COUNTERS, 1))
    return {s.name for fam in text_string_to_metric_families(render(r, KEYS).decode()) for s in fam.samples}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads((COMPOSE / "grafana" / "dashboards" / "arbiter.json").read_text())


def exprs(dashboard: dict) -> list[str]:
    found = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", []) if t.get("expr")]
    for var in dashboard.get("templating", {}).get("list", []):
        q = var.get("query")
        found.append(q.get("query", "") if isinstance(q, dict) else str(q or ""))
    return found


def test_dashboard_metrics_are_exported(dashboard, exported):
    assert 36 <= dashboard["schemaVersion"] <= 41
    used = {m for e in exprs(dashboard) for m in re.findall(r"\barbiter_[a-z0-9_]+\b", e)}
    assert used, "the dashboard queries no arbiter metric"
    assert not used - exported, f"queried but not exported: {sorted(used - exported)}"


def test_dashboard_has_the_panels(dashboard):
    text = " ".join(exprs(dashboard))
    assert 'histogram_quantile' in text
    for needle in ("arbiter_job_queue_wait_seconds_bucket", "arbiter_job_duration_seconds_bucket",
                   'workload="llm",priority="interactive"', "arbiter_budget_quality_ratio",
                   "arbiter_quality_mean_ratio", "rate(arbiter_preemptions_total[5m])",
                   "arbiter_gpu_vram_used_bytes", "arbiter_gpu_vram_usable_bytes", "arbiter_queue_depth",
                   "arbiter_cache_hits_total", "arbiter_cache_misses_total"):
        assert needle in text, needle
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_grafana_provisioning_points_at_the_dashboard_and_datasource(services, dashboard):
    ds = yaml.safe_load((COMPOSE / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    assert ds[0]["type"] == "prometheus" and ds[0]["url"] == "http://prometheus:9090"
    uids = {p["datasource"]["uid"] for p in dashboard["panels"]}
    assert uids == {ds[0]["uid"]}
    provider = yaml.safe_load((COMPOSE / "grafana/provisioning/dashboards/arbiter.yml").read_text())["providers"][0]
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    assert "GF_SECURITY_ADMIN_PASSWORD" in env_of(services["grafana"])


def test_the_nodes_profile_adds_distinct_nodes_with_their_own_tiers(services):
    nodes = {n: s for n, s in services.items() if "nodes" in s.get("profiles", [])}
    assert len(nodes) >= 2
    names = {env_of(s)["ARBITER_NODE"] for s in nodes.values()}
    cpu_node = env_of(services[CPU_WORKERS[0]])["ARBITER_NODE"]
    assert len(names) == len(nodes) and cpu_node not in names          # one id per node, none shared
    disk = [next(v for v in s["volumes"] if v.endswith(":/var/cache/arbiter/fragments")) for s in nodes.values()]
    assert len(set(disk)) == len(disk)                                   # each node its own disk tier
    for s in nodes.values():
        cmd = argv(s)
        assert "worker" in cmd and cmd[cmd.index("--backend") + 1] == "sim"
        assert env_of(s)["ARBITER_REDIS_URL"] == env_of(services[CPU_WORKERS[0]])["ARBITER_REDIS_URL"]
