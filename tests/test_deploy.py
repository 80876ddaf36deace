"""The deployment kit in deploy/: static checks that need no container engine, one real run
of deploy/local-stack.sh (MLflow server + coordinator + 2 sites, 1 round, TLS and SuperNode
authentication on, loopback only), and one stopped by SIGTERM mid-way (slow, bounded).

Static checks (CI runs them with the rest of the suite):
- compose.yaml / compose.gpu.yaml: valid against the Compose Specification JSON schema
  (vendored in deploy/schema/, the check ``docker compose config`` would do), plus the
  structure a hospital relies on: each site mounts only its own data folder read-only, its
  own state volume, the CA certificate and its own key; secrets come from deploy/secrets/;
  env files and Dockerfiles exist; images are tagged with the project version; every site
  has a restart policy that starts it again after it exits (69: no coordinator);
- deploy/systemd/nearl-client@.service: Restart=on-failure without a start limit, but not
  for exit status 2 (a setting to fix); ``systemd-analyze verify`` when it is installed;
- env files: the syntax that docker compose and local-stack.sh read identically, and every
  NEARL_* key is read by a run script;
- k8s: every document has apiVersion/kind/metadata.name, PVCs exist for every claim, images
  and secrets are referenced consistently, ConfigMaps equal the env files, Services select
  pods; ``kubectl kustomize`` renders them offline when kubectl exists;
- Dockerfiles: non-root USER, HEALTHCHECK, installed as the README installs the project;
- no secret is committed; ``bash -n`` on every script; the run scripts and the health
  check fail with one readable line.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
ENV_DIR = DEPLOY / "env"
K8S = DEPLOY / "k8s"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
SITES = ("site1", "site2")
ENV_LINE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=[^\"'$#]*$")
PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def compose() -> dict:
    return load_yaml(DEPLOY / "compose.yaml")


def interpolate(value: str) -> str:
    """``${VAR:-default}`` as docker compose resolves it with VAR unset."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}", r"\1", value)


def read_env(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def mounts(service: dict) -> list[dict]:
    out = []
    for m in service.get("volumes", []):
        assert isinstance(m, dict), f"use the long volume syntax (type/source/target), got {m!r}"
        out.append({**m, "source": interpolate(str(m.get("source", "")))})
    return out


def k8s_docs() -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path, doc))
    return docs


def pod_specs(docs) -> list[tuple[dict, dict]]:
    """(workload, pod template) for every Deployment, StatefulSet, Job."""
    return [(d, d["spec"]["template"]) for _, d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job")]


def dockerfile(name: str) -> list[str]:
    """Instructions of deploy/docker/NAME, continuation lines joined, comments dropped."""
    text = (DEPLOY / "docker" / name).read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    return [ins.strip() for ins in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines() if ins.strip()]


# -- compose ------------------------------------------------------------------------------------
def test_compose_files_match_the_compose_specification_schema():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((DEPLOY / "schema" / "compose-spec.json").read_text())
    validator = jsonschema.Draft201909Validator(schema)
    for name in ("compose.yaml", "compose.gpu.yaml"):
        errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(load_yaml(DEPLOY / name))]
        assert not errors, f"deploy/{name}:\n" + "\n".join(errors)
    # the schema is not vacuous: a misspelt key and a wrong type are refused
    broken = compose()
    broken["services"]["site1"]["read-only"] = True
    broken["services"]["site2"]["volumes"] = "data:/data"
    assert len(list(validator.iter_errors(broken))) >= 2
    gpu = load_yaml(DEPLOY / "compose.gpu.yaml")
    assert set(gpu["services"]) <= set(compose()["services"]), "compose.gpu.yaml overrides unknown services"


def test_compose_topology_mounts_and_secrets():
    c = compose()
    services, volumes, networks = c["services"], c["volumes"], c["networks"]
    assert {"mlflow", "coordinator", *SITES} <= set(services)
    for name, svc in services.items():
        if "profiles" in svc:
            continue  # optional services (postgres) are checked by the schema only
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no health check"
        for m in mounts(svc):
            if m["type"] == "volume":
                assert m["source"] in volumes, f"{name}: volume {m['source']} is not declared"
            if "secrets" in m["source"]:
                assert m["source"].startswith("./secrets/"), f"{name}: secrets come from deploy/secrets/"
                assert m.get("read_only") is True, f"{name}: {m['source']} must be mounted read-only"
                assert not m["source"].endswith("ca.key"), f"{name}: the CA key never leaves the admin"
        for net in svc.get("networks", []):
            assert net in networks

    ml = services["mlflow"]
    store = [m for m in mounts(ml) if m["target"] == "/var/lib/mlflow"]
    assert store and store[0]["type"] == "volume", "MLflow needs its own persistent volume"
    assert "/app/deploy/run/mlflow.sh" in ml["command"]

    co = services["coordinator"]
    targets = {m["target"]: m for m in mounts(co)}
    assert targets["/var/lib/nearl/checkpoints"]["type"] == "volume"
    assert {"/run/nearl/certs/ca.crt", "/run/nearl/certs/server.pem", "/run/nearl/certs/server.key",
            "/run/nearl/site-keys"} <= set(targets)
    assert targets["/run/nearl/site-keys"]["source"] == "./secrets/site-keys"
    co_env = {k: v for f in co["env_file"] for k, v in read_env(DEPLOY / f).items()}
    assert co_env["NEARL_CERTS"] == "/run/nearl/certs" and co_env["NEARL_AUTH_KEYS"] == "/run/nearl/site-keys"
    assert co_env["NEARL_CHECKPOINT_DIR"] == "/var/lib/nearl/checkpoints"
    assert co_env["NEARL_MLFLOW_URI"] == f"http://mlflow:{read_env(ENV_DIR / 'mlflow.env')['NEARL_MLFLOW_PORT']}"
    assert "ports" not in co, "the coordinator publishes nothing: the hospitals reach it through fleet-proxy"

    state_volumes = set()
    for site in SITES:
        svc = services[site]
        ms = mounts(svc)
        env = {k: v for f in svc["env_file"] for k, v in read_env(DEPLOY / f).items()}
        assert env["NEARL_SITE"] == site
        data = [m for m in ms if m["target"] == env["NEARL_DATA"]]
        assert len(data) == 1 and data[0]["type"] == "bind" and data[0]["read_only"] is True, \
            f"{site}: mount its data folder read-only at {env['NEARL_DATA']}"
        assert site in data[0]["source"] and not any(o in data[0]["source"] for o in SITES if o != site)
        state = [m for m in ms if m["target"] == env["NEARL_CLIENT_HOME"]]
        assert len(state) == 1 and state[0]["type"] == "volume" and site in state[0]["source"]
        state_volumes.add(state[0]["source"])
        secrets = {m["target"]: m["source"] for m in ms if "secrets" in m["source"]}
        assert secrets == {f"{env['NEARL_CERTS']}/ca.crt": "./secrets/certs/ca.crt",
                           env["NEARL_AUTH_KEY"]: f"./secrets/keys/{site}"}, \
            f"{site} gets exactly the CA certificate and its own private key, got {secrets}"
        assert "tracking" not in svc["networks"], f"{site} must not reach MLflow"
        assert env["NEARL_SERVER"] == f"coordinator:{co_env['NEARL_PORT']}"
        # on the sites' network "coordinator" is the Fleet proxy; the coordinator itself is not there
        assert not set(svc["networks"]) & set(co["networks"]), f"{site} must not reach the coordinator directly"
        assert "coordinator" in services["fleet-proxy"]["networks"][svc["networks"][0]]["aliases"]
        assert "/app/deploy/run/site.sh" in svc["command"]
    assert len(state_volumes) == len(SITES), "every site needs its own state volume"


def test_every_site_comes_back_by_itself_after_it_exits():
    """A site exits 69 when its coordinator stays away for NEARL_CONNECT_TIMEOUT seconds (client/connection.py):
    its restart policy starts it again, in compose.yaml and with the GPU overlay; the coordinator (one run) is
    not restarted."""
    from client.connection import EXIT_DISCONNECTED

    services, gpu = compose()["services"], load_yaml(DEPLOY / "compose.gpu.yaml")["services"]
    for site in SITES:
        for svc in (services[site], {**services[site], **gpu.get(site, {})}):
            assert svc.get("restart") in ("on-failure", "unless-stopped", "always"), \
                f"{site}: a site that exits {EXIT_DISCONNECTED} must be started again"
    assert services["coordinator"]["restart"] == "no"
    limit = read_env(ENV_DIR / "site.env")["NEARL_CONNECT_TIMEOUT"]
    assert float(limit) > 0, "by default a site gives up and its restart policy starts it again"
    assert 'args+=(--connect-timeout "$NEARL_CONNECT_TIMEOUT")' in (DEPLOY / "run" / "site.sh").read_text()


SYSTEMD_UNIT = DEPLOY / "systemd" / "nearl-client@.service"


def unit_settings(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit's settings: section -> key -> values (a key may repeat)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = out.setdefault(line.strip("[]"), {})
            continue
        key, sep, value = line.partition("=")
        assert sep and section is not None, f"{path.name}: not KEY=VALUE in a section: {line}"
        section.setdefault(key.strip(), []).append(value.strip())
    return out


def test_the_systemd_unit_restarts_a_site_that_lost_its_coordinator_and_not_a_misconfigured_one(tmp_path):
    from client.connection import EXIT_DISCONNECTED

    unit = unit_settings(SYSTEMD_UNIT)
    svc = unit["Service"]
    assert svc["Restart"] == ["on-failure"] and float(svc["RestartSec"][0]) > 0
    prevented = " ".join(svc.get("RestartPreventExitStatus", [])).split()
    assert prevented == ["2"] and str(EXIT_DISCONNECTED) not in prevented  # 2: a setting to fix
    assert unit["Unit"]["StartLimitIntervalSec"] == ["0"], "a coordinator may be away for hours: never stop restarting"
    [start] = svc["ExecStart"]
    assert start.endswith("/deploy/run/site.sh") and "NEARL_SITE=%i" in start
    assert "NEARL_CLIENT_HOME=/var/lib/nearl/%i" in start and svc["StateDirectory"] == ["nearl/%i"]
    assert "/etc/nearl/sites/%i.env" in svc["EnvironmentFile"]
    assert svc["User"] == ["nearl"] and svc["KillMode"] == ["control-group"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    text = SYSTEMD_UNIT.read_text()
    for key in re.findall(r"^#\s+(NEARL_[A-Z_]+)=", text, flags=re.M):  # the env file the comment shows
        assert key in read_env(ENV_DIR / "site.env"), f"{key} is not a site setting (deploy/env/site.env)"
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed: the unit's syntax is not verified")
    copy = tmp_path / SYSTEMD_UNIT.name
    copy.write_text(text)
    res = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "nearl-client@site1.service")],
                         capture_output=True, text=True, timeout=120)
    complaints = [ln for ln in (res.stdout + res.stderr).splitlines() if str(tmp_path) in ln]
    assert res.returncode == 0 and not complaints, res.stdout + res.stderr


NGINX_CONF = DEPLOY / "nginx" / "nearl-fleet.conf"


def nginx_locations(text: str) -> dict[str, str]:
    """``location`` match -> its block body, for the TLS server block of the nginx config."""
    server = text.split("listen 9092 ssl;", 1)[1].split("\nserver {", 1)[0]
    out, pos = {}, 0
    for m in re.finditer(r"location\s+([^{]+?)\s*\{", server):
        if m.start() < pos:
            continue
        depth, i = 1, m.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(server[i], 0)
            i += 1
        out[m.group(1).strip()] = server[m.end():i - 1]
        pos = i
    return out


def test_only_the_fleet_proxy_publishes_a_port_for_the_hospitals():
    services = compose()["services"]
    published = {name: svc["ports"] for name, svc in services.items() if svc.get("ports")}
    assert published.pop("fleet-proxy") == ["9092:9092"]
    for name, ports in published.items():  # anything else: the Docker host's loopback only (the MLflow UI)
        assert all(str(p).startswith("127.0.0.1:") for p in ports), f"{name} publishes {ports}"
    proxy = services["fleet-proxy"]
    assert proxy["image"].startswith("nginx:") and proxy["depends_on"]["coordinator"]["condition"] == "service_healthy"
    targets = {m["target"]: m for m in mounts(proxy)}
    assert targets["/etc/nginx/conf.d/default.conf"]["source"] == "./nginx/nearl-fleet.conf"
    assert {"/etc/nginx/certs/ca.crt", "/etc/nginx/certs/server.pem", "/etc/nginx/certs/server.key"} <= set(targets)
    assert "nearl-coordinator" in services["coordinator"]["networks"]["fleet-backend"]["aliases"]
    assert "fleet-backend" in proxy["networks"]


def test_nginx_forwards_exactly_the_fleet_api_and_health_and_refuses_the_rest():
    text = NGINX_CONF.read_text()
    locations = nginx_locations(text)
    assert set(locations) == {"~ ^/v1/fleet/[a-z][a-z0-9-]*$", "= /health", "/"}, locations
    fleet, health, rest = locations["~ ^/v1/fleet/[a-z][a-z0-9-]*$"], locations["= /health"], locations["/"]
    assert "limit_except POST" in fleet and "proxy_pass https://nearl_coordinator;" in fleet
    assert "limit_except GET" in health and "proxy_pass https://nearl_coordinator;" in health
    assert rest.strip() == "return 403;"
    assert text.count("proxy_pass") == 3  # the two above and the health-check listener's /health
    assert "server nearl-coordinator:9092;" in text
    for directive in ("ssl_certificate     /etc/nginx/certs/server.pem;", "proxy_ssl_verify         on;",
                      "proxy_ssl_trusted_certificate /etc/nginx/certs/ca.crt;", "listen 127.0.0.1:8081;"):
        assert directive in text, directive
    pattern = re.compile(r"^/v1/fleet/[a-z][a-z0-9-]*$")
    assert pattern.match("/v1/fleet/pull-messages") and not pattern.match("/v1/control/start-run")
    assert not pattern.match("/v1/fleet/pull-messages/x") and not pattern.match("/v1/runtime/pull-messages")


def nginx_server_directives(text: str) -> dict[str, str]:
    """``name -> value`` of the directives at the top level of the TLS server block."""
    server = text.split("listen 9092 ssl;", 1)[1].split("\nserver {", 1)[0]
    return dict(re.findall(r"^ {4}([a-z_]+)\s+([^;{]+);", server, re.M))


def nginx_bytes(size: str) -> int:
    return int(size[:-1]) * {"k": 2**10, "m": 2**20, "g": 2**30}[size[-1]] if size[-1].isalpha() else int(size)


def test_nginx_limits_are_the_built_in_proxys_defaults():
    from server.proxy import Limits

    text, limits = NGINX_CONF.read_text(), Limits()
    d = nginx_server_directives(text)
    assert nginx_bytes(d["client_max_body_size"]) == limits.max_body_bytes
    assert d["client_header_timeout"] == d["client_body_timeout"] == f"{limits.client_timeout:g}s"
    zone = re.search(r"^limit_req_zone\s+\$binary_remote_addr zone=(\w+):\d+m rate=(\d+)r/s;", text, re.M)
    assert zone and float(zone.group(2)) == limits.rate
    assert d["limit_req"] == f"zone={zone.group(1)} burst={limits.burst} nodelay"
    conn = re.search(r"^limit_conn_zone\s+\$binary_remote_addr zone=(\w+):\d+m;", text, re.M)
    assert conn and d["limit_conn"] == f"{conn.group(1)} {limits.max_connections}"
    assert d["limit_req_status"] == d["limit_conn_status"] == "429"
    for where, body in nginx_locations(text).items():  # every location inherits them
        assert "limit_req" not in body and "limit_conn" not in body and "client_" not in body, where


def test_behind_nginx_the_coordinator_leaves_the_per_address_limits_to_it():
    from server.cli import build_parser

    off = {"NEARL_RATE_LIMIT": "0", "NEARL_MAX_CONNECTIONS": "0"}
    assert compose()["services"]["coordinator"]["environment"] == off
    objects = {(d["kind"], d["metadata"]["name"]): d for p, d in k8s_docs() if p.name != "kustomization.yaml"}
    (co,) = objects[("Job", "nearl-coordinator")]["spec"]["template"]["spec"]["containers"]
    assert {e["name"]: e["value"] for e in co["env"]} == off
    assert objects[("Service", "nearl-fleet-proxy")]["spec"]["externalTrafficPolicy"] == "Local"  # client addresses
    # local-stack.sh has no nginx: coordinator.env leaves every limit to nearl-server's defaults
    limits = {k: v for k, v in read_env(ENV_DIR / "coordinator.env").items() if k in (*off, "NEARL_MAX_BODY_MB")}
    assert limits == {"NEARL_RATE_LIMIT": "", "NEARL_MAX_CONNECTIONS": "", "NEARL_MAX_BODY_MB": ""}
    script = (DEPLOY / "run" / "coordinator.sh").read_text()
    flags = {s for a in build_parser()._actions for s in a.option_strings}
    for var, flag in (("NEARL_RATE_LIMIT", "--rate-limit"), ("NEARL_MAX_CONNECTIONS", "--max-connections"),
                      ("NEARL_MAX_BODY_MB", "--max-body-mb")):
        assert f"{var}:{flag}" in script and flag in flags


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_nginx_body_limit_covers_every_shipped_config_that_builds_offline():
    """BiomedCLIP needs its hub files to build; its 1.71M adapter parameters give about 11.3 MB."""
    d = nginx_server_directives(NGINX_CONF.read_text())
    configs = ("demo", "vit-b16", "tiny-timm-bert")
    res = subprocess.run([sys.executable, "-m", "server.body_bound", "--secure-aggregation", *configs], cwd=ROOT,
                         capture_output=True, text=True, timeout=540, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    bounds = {row["config"]: row["max_body_bytes"] for row in map(json.loads, res.stdout.splitlines())}
    assert set(bounds) == set(configs)
    assert max(bounds.values()) <= nginx_bytes(d["client_max_body_size"]) <= 2 * max(bounds.values()), bounds


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx not installed")
def test_nginx_accepts_the_config(tmp_path):
    conf = NGINX_CONF.read_text().replace("nearl-coordinator:9092", "127.0.0.1:9")
    certs = tmp_path / "certs"
    subprocess.run([str(DEPLOY / "make-certs.sh"), "--out", str(certs), "localhost"], check=True, capture_output=True,
                   timeout=120)
    (tmp_path / "site.conf").write_text(conf.replace("/etc/nginx/certs", str(certs)))
    temp = " ".join(f"{k}_temp_path {tmp_path / k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (tmp_path / "nginx.conf").write_text(f"pid {tmp_path / 'nginx.pid'}; error_log {tmp_path / 'error.log'};\n"
                                         f"events {{}}\nhttp {{ access_log off; {temp} include {tmp_path / 'site.conf'}; }}\n")
    res = subprocess.run(["nginx", "-t", "-q", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def test_compose_builds_env_files_and_images_exist():
    for name, svc in compose()["services"].items():
        for f in svc.get("env_file", []):
            assert (DEPLOY / f).is_file(), f"{name}: env file deploy/{f} missing"
        build = svc.get("build")
        if build:
            context = (DEPLOY / build["context"]).resolve()
            assert context == ROOT, f"{name}: build from the repository root"
            assert (context / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']} missing"
            image = svc["image"]
            assert image.split(":")[1] == VERSION, f"{name}: tag {image} with the project version {VERSION}"
            kind = "coordinator" if build["dockerfile"].endswith("coordinator") else "site"
            assert image == f"nearl-{kind}:{VERSION}"
        for part in svc.get("command", []):
            if part.startswith("/app/"):
                assert (ROOT / part[len("/app/"):]).is_file(), f"{name}: {part} is not in the image"


def test_env_files_parse_the_same_in_compose_and_local_stack_and_are_used():
    files = sorted(ENV_DIR.glob("*.env"))
    assert {f.name for f in files} >= {"common.env", "mlflow.env", "coordinator.env", "site.env", "site1.env",
                                       "site2.env"}
    readers = "\n".join(p.read_text() for p in [*(DEPLOY / "run").glob("*.sh"), DEPLOY / "docker" / "healthcheck.py"])
    for f in files:
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                assert ENV_LINE.match(line), (f"deploy/env/{f.name}:{n}: write KEY=VALUE without quotes, '$' or '#' "
                                              f"(read identically by docker compose and local-stack.sh): {line}")
                key = line.split("=", 1)[0]
                if key.startswith("NEARL_"):
                    assert key in readers, f"deploy/env/{f.name}: {key} is not read by any deploy/run script"


# -- Kubernetes ---------------------------------------------------------------------------------
def test_k8s_manifests_are_complete_and_consistent():
    docs = k8s_docs()
    kustom = load_yaml(K8S / "kustomization.yaml")
    for path, d in docs:
        if path.name == "kustomization.yaml":
            continue
        assert d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name"), f"{path.name}: {d}"
        assert d["kind"] != "Secret", f"{path.name}: secrets are created with kubectl, never committed"
    assert sorted(kustom["resources"]) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    objects = {(d["kind"], d["metadata"]["name"]): d for p, d in docs if p.name != "kustomization.yaml"}
    assert ("PersistentVolumeClaim", "nearl-checkpoints") in objects and ("PersistentVolumeClaim", "mlflow-store") in objects
    pvcs = {n for k, n in objects if k == "PersistentVolumeClaim"}
    configmaps = {n for k, n in objects if k == "ConfigMap"}
    images = {i["name"]: i for i in kustom["images"]}
    assert images["nearl-coordinator"]["newTag"] == VERSION

    workloads = pod_specs(docs)
    assert {w["metadata"]["name"] for w, _ in workloads} == {"mlflow", "nearl-coordinator", "nearl-fleet-proxy"}
    secret_names = set()
    for workload, template in workloads:
        name, spec = workload["metadata"]["name"], template["spec"]
        if workload["kind"] != "Job":
            assert workload["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in pvcs, f"{name}: PVC {v} not defined"
            if "secret" in v:
                secret_names.add(v["secret"]["secretName"])
        for c in spec["containers"]:
            if name == "nearl-fleet-proxy":  # nginx; checked in test_k8s_fleet_proxy_is_the_only_way_in
                continue
            assert c["image"] == "nearl-coordinator", f"{name}: use the image name set in kustomization.yaml"
            assert (ROOT / c["command"][0][len("/app/"):]).is_file()
            for ref in c.get("envFrom", []):
                assert ref["configMapRef"]["name"] in configmaps
            for vm in c.get("volumeMounts", []):
                assert vm["name"] in volumes
            probe = c.get("readinessProbe", {}).get("exec", {}).get("command", [])
            assert "/app/deploy/docker/healthcheck.py" in probe, f"{name}: probe with the image's health check"
    assert secret_names == {"nearl-tls", "nearl-site-keys"}
    claims = {v["persistentVolumeClaim"]["claimName"] for _, t in workloads for v in t["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    assert claims == pvcs, "every PVC is used by a workload"

    pod_labels = [t["metadata"]["labels"] for _, t in workloads]
    for (kind, name), d in objects.items():
        if kind == "Service":
            assert any(d["spec"]["selector"].items() <= labels.items() for labels in pod_labels), \
                f"Service {name} selects no pod"

    # the ConfigMaps carry the same settings as the env files compose and local-stack.sh use
    for cm, env in (("nearl-common", "common.env"), ("nearl-coordinator", "coordinator.env"),
                    ("nearl-mlflow", "mlflow.env")):
        assert objects[("ConfigMap", cm)]["data"] == read_env(ENV_DIR / env), f"ConfigMap {cm} != deploy/env/{env}"


def test_k8s_fleet_proxy_is_the_only_way_in():
    objects = {(d["kind"], d["metadata"]["name"]): d for p, d in k8s_docs() if p.name != "kustomization.yaml"}
    exposed = {n for (k, n), d in objects.items() if k == "Service" and d["spec"].get("type", "ClusterIP") != "ClusterIP"}
    assert exposed == {"nearl-fleet-proxy"}
    assert objects[("ConfigMap", "nearl-fleet-proxy")]["data"]["nearl-fleet.conf"] == NGINX_CONF.read_text(), \
        "ConfigMap nearl-fleet-proxy != deploy/nginx/nearl-fleet.conf"
    pod = objects[("Deployment", "nearl-fleet-proxy")]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"].startswith("nginxinc/nginx-unprivileged:")
    mounts_ = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts_["/etc/nginx/conf.d/default.conf"]["subPath"] == "nearl-fleet.conf"
    assert "/etc/nginx/certs" in mounts_
    assert "http://127.0.0.1:8081/health" in c["readinessProbe"]["exec"]["command"]
    policy = objects[("NetworkPolicy", "coordinator-from-fleet-proxy")]["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "nearl-coordinator"}
    (rule,) = policy["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "nearl-fleet-proxy"}}}]


def test_k8s_manifests_render_offline_with_kubectl_kustomize():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: the manifests were checked by the YAML structure test only")
    # `kubectl create --dry-run=client` still asks an API server for its resource types; kustomize
    # is the part of kubectl that works with no cluster at all.
    res = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    rendered = [d for d in yaml.safe_load_all(res.stdout) if d]
    expected = {(d["kind"], d["metadata"]["name"]) for p, d in k8s_docs() if p.name != "kustomization.yaml"}
    assert {(d["kind"], d["metadata"]["name"]) for d in rendered} == expected
    for d in rendered:
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "nearl"
        for c in d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            if d["metadata"]["name"] != "nearl-fleet-proxy":
                assert c["image"] == f"nearl-coordinator:{VERSION}"


# -- images -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,role", [("Dockerfile.coordinator", "coordinator"), ("Dockerfile.site", "site")])
def test_dockerfiles_run_as_non_root_with_a_health_check_and_install_as_the_readme(name, role):
    ins = dockerfile(name)
    users = [i.split()[1] for i in ins if i.upper().startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), f"{name}: the last USER must not be root"
    health = [i for i in ins if i.upper().startswith("HEALTHCHECK ")]
    assert len(health) == 1 and f'"/app/deploy/docker/healthcheck.py", "{role}"' in health[0]
    text = "\n".join(ins)
    # the README's install (Makefile): a venv, pip upgraded, an editable install of the source tree
    assert "python3 -m venv /opt/venv" in text and "pip install --upgrade pip" in text
    assert "COPY . /app" in text and "pip install -e /app" in text
    assert ins[0].startswith("ARG BASE_IMAGE=python:3.") and ins[0].endswith("-slim")
    assert any(i.startswith("FROM ${BASE_IMAGE}") for i in ins)
    cmd = [i for i in ins if i.startswith("CMD ")][-1]
    script = json.loads(cmd[4:])[0]
    assert (ROOT / script[len("/app/"):]).is_file()
    if role == "site":
        assert "TORCH_INDEX_URL" in text  # a CUDA build of torch can be chosen at build time


def test_dockerignore_keeps_secrets_data_and_environments_out_of_images():
    lines = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {"deploy/secrets", ".venv", ".git", "demo-data", "runs"} <= lines


def test_no_secrets_are_committed():
    ignored = subprocess.run(["git", "check-ignore", "-q", "deploy/secrets/certs/ca.key"], cwd=ROOT)
    if ignored.returncode == 128:
        pytest.skip("not a git checkout")
    assert ignored.returncode == 0, "deploy/secrets/ must stay in .gitignore"
    tracked = subprocess.run(["git", "ls-files", "deploy", ".dockerignore"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    for rel in tracked:
        assert not rel.startswith("deploy/secrets/"), rel
        assert not re.search(r"\.(key|pem|crt|p12|pfx)$", rel), f"{rel}: certificate material is never committed"
        path = ROOT / rel
        if path.is_file():
            assert not PRIVATE_KEY.search(path.read_text(errors="replace")), f"{rel} holds a private key"


# -- scripts ------------------------------------------------------------------------------------
def test_scripts_are_valid_bash_and_executable():
    scripts = sorted([*DEPLOY.glob("*.sh"), *(DEPLOY / "run").glob("*.sh")])
    assert {"local-stack.sh", "make-certs.sh", "make-site-key.sh", "make-stack-secrets.sh", "coordinator.sh",
            "site.sh", "mlflow.sh"} <= {s.name for s in scripts}
    for script in scripts:
        res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, f"{script.name}: {res.stderr}"
        assert os.access(script, os.X_OK), f"{script.name} is not executable"


def run_script(script: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(["bash", str(DEPLOY / script), *args], env={**base, **env}, capture_output=True,
                          text=True, timeout=60)


def test_run_scripts_refuse_missing_tls_material_and_keys_with_one_line(tmp_path):
    res = run_script("run/coordinator.sh", {"NEARL_CERTS": str(tmp_path / "none")})
    assert res.returncode == 2 and "make-certs.sh" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    certs = tmp_path / "certs"
    certs.mkdir()
    for f in ("ca.crt", "server.pem", "server.key"):
        (certs / f).write_text("x")
    res = run_script("run/coordinator.sh", {"NEARL_CERTS": str(certs), "NEARL_AUTH_KEYS": str(tmp_path)})
    assert res.returncode == 2 and "*.pub" in res.stderr
    res = run_script("run/site.sh", {"NEARL_SERVER": "coordinator:9092"})
    assert res.returncode == 2 and "NEARL_SITE" in res.stderr
    res = run_script("run/site.sh", {"NEARL_SITE": "siteA", "NEARL_SERVER": "x:1", "NEARL_CERTS": str(certs),
                                     "NEARL_AUTH_KEY": str(tmp_path / "nokey")})
    assert res.returncode == 2 and "make-site-key.sh siteA" in res.stderr
    res = run_script("local-stack.sh", {}, "--sites", "0")
    assert res.returncode == 2 and "--sites 0" in res.stderr
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    res = run_script("local-stack.sh", {}, "--workdir", str(busy))
    assert res.returncode == 2 and "not empty" in res.stderr and (busy / "keep.txt").read_text() == "mine"


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_healthcheck_reports_healthy_and_unhealthy(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    check = [sys.executable, str(DEPLOY / "docker" / "healthcheck.py")]
    try:
        for role, var in (("mlflow", "NEARL_MLFLOW_PORT"), ("site", "NEARL_NODE_PORT")):
            ok = subprocess.run([*check, role], env={**os.environ, var: str(port)}, capture_output=True, text=True,
                                timeout=30)
            assert ok.returncode == 0, ok.stderr
    finally:
        server.shutdown()
        server.server_close()
    down = subprocess.run([*check, "site"], env={**os.environ, "NEARL_NODE_PORT": str(port)}, capture_output=True,
                          text=True, timeout=30)
    assert down.returncode == 1 and "not healthy" in down.stderr
    no_ca = subprocess.run([*check, "coordinator"], env={**os.environ, "NEARL_CERTS": str(tmp_path)},
                           capture_output=True, text=True, timeout=30)
    assert no_ca.returncode == 1 and "ca.crt" in no_ca.stderr


# -- the whole stack, for real --------------------------------------------------------------------
def stack_processes(workdir: Path) -> list[int]:
    """Live processes that local-stack.sh marked as its own (NEARL_STACK_DIR=workdir)."""
    marker = f"NEARL_STACK_DIR={workdir}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_local_stack_two_sites_one_round_with_tls_auth_and_mlflow(tmp_path):
    work = tmp_path / "stack"
    log = tmp_path / "local-stack.out"
    env = {**os.environ, "NEARL_VENV": str(Path(sys.executable).parent.parent)}
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(DEPLOY / "local-stack.sh"), "--sites", "2", "--rounds", "1", "--workdir",
                                 str(work), "--timeout", "1500"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=1700)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # the script's trap stops what it started
            proc.wait(timeout=120)
            raise AssertionError(f"local-stack.sh did not finish:\n{log.read_text()[-6000:]}") from None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text(errors="replace")
    assert rc == 0, text[-6000:]

    # TLS and SuperNode authentication were on at both ends
    assert "(TLS, SuperNode authentication on)" in text, text
    superlink = next(line for line in text.splitlines() if "SuperLink process:" in line)
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth"):
        assert flag in superlink, superlink
    assert "--insecure" not in superlink
    assert "registered site key site1.pub" in text and "registered site key site2.pub" in text
    nodes = [line for line in text.splitlines() if "SuperNode process (healthy):" in line]
    assert len(nodes) == 2
    for line in nodes:
        assert "--root-certificates" in line and "--auth-supernode-private-key" in line and "--insecure" not in line
    assert "healthcheck: coordinator healthy (https://127.0.0.1:" in text
    assert "round 1/1  sites 2/2" in text, text[-4000:]
    assert "MLflow UI was at http://127.0.0.1:" in text

    # the MLflow server's store holds the run, the round of metrics
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("nearl-federated")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    rid = runs[0].info.run_id
    hist = lambda key: {m.step: m.value for m in client.get_metric_history(rid, key)}  # noqa: E731
    assert set(hist("train_loss")) == {1}
    assert hist("sites_answered") == {1: 2.0}
    assert set(hist("eval_accuracy")) == {0, 1}
    assert (work / "checkpoints" / "final" / "adapters.safetensors").is_file()
    assert list((work / "mlflow" / "artifacts").rglob("adapters.safetensors")), "artifacts went through the server"

    # nothing left running
    assert "all processes stopped" in text
    assert stack_processes(work) == []


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_local_stack_stops_everything_when_terminated(tmp_path):
    """SIGTERM to the script (as a service manager or Ctrl-C would stop it) once the coordinator's
    SuperLink is up: every process of the stack, Flower's own children included, is stopped."""
    work = tmp_path / "stack"
    log = tmp_path / "local-stack.out"
    env = {**os.environ, "NEARL_VENV": str(Path(sys.executable).parent.parent)}
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(DEPLOY / "local-stack.sh"), "--workdir", str(work)], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 600
            while "SuperLink process:" not in log.read_text(errors="replace"):
                assert proc.poll() is None, log.read_text()[-4000:]
                assert time.monotonic() < deadline, f"the coordinator did not start:\n{log.read_text()[-4000:]}"
                time.sleep(1)
            assert stack_processes(work), "nothing of the stack is running"
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=180)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text(errors="replace")
    assert rc == 143, text[-4000:]
    assert "terminated" in text and "all processes stopped" in text, text[-4000:]
    assert stack_processes(work) == []
