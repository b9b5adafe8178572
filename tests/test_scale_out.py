"""Scale-out: replicas behind nginx (docker/docker-compose.replicas.yml, docker/nginx/nginx.conf),
Prometheus scraping each replica, and the Kubernetes manifests (docker/k8s/).

No Docker engine or cluster runs here, so the real pieces run natively: Debian's nginx with the
shipped configuration (only the lines it marks "loopback:" changed) in front of two real
`treespec serve` processes, and Debian's Prometheus with the replicas' scrape configuration.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import route_paths, tiny_model
from test_deploy import (COMPOSE, DASHBOARD, DOCKER, as_promql, free_port, needs_prometheus, prom_query,
                         running, running_prometheus, total, wait_until)
from test_server import start_server, stop_server

NGINX_CONF = DOCKER / "nginx" / "nginx.conf"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else None)
needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (.ci/run installs Debian's nginx)")


# ---------------------------------------------------------------- compose files

class ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's merge tags: !reset (drop the base value) and !override (replace it)."""


ComposeLoader.add_constructor("!reset", lambda loader, node: Reset())
ComposeLoader.add_constructor("!override", lambda loader, node: Override(loader.construct_sequence(node)
                                                                           if isinstance(node, yaml.SequenceNode)
                                                                           else loader.construct_mapping(node)))


class Reset:
    pass


class Override:
    def __init__(self, value):
        self.value = value


def merge(base, over):
    """Compose's merge of an override file onto a base (the parts these files use): mappings merge
    key by key, sequences append, !reset removes, !override replaces."""
    if isinstance(over, Override):
        return over.value
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            if isinstance(v, Reset):
                out.pop(k, None)
            else:
                out[k] = merge(base[k], v) if k in base else (v.value if isinstance(v, Override) else v)
        return out
    if isinstance(base, list) and isinstance(over, list):
        return base + [x for x in over if x not in base]
    return over


REPLICAS = yaml.load((DOCKER / "docker-compose.replicas.yml").read_text(), Loader=ComposeLoader)
MERGED = merge(COMPOSE, REPLICAS)


def nginx_upstream_hosts() -> list[str]:
    text = NGINX_CONF.read_text()
    block = re.search(r"upstream treespec \{(.*?)\n    \}", text, re.S).group(1)
    return re.findall(r"^\s*server\s+(\S+)", block, re.M)


def test_replicas_compose_puts_nginx_in_front_of_every_replica():
    svc = MERGED["services"]
    assert "ports" not in svc["treespec"], "replicas cannot share the host port: the balancer owns it"
    assert str(svc["treespec"]["deploy"]["replicas"]).startswith("${TREESPEC_REPLICAS:-")
    lb = svc["lb"]
    assert lb["image"].startswith("nginx:") and lb["ports"] == ["8000:8000"]
    (mount,) = lb["volumes"]
    src, target, mode = mount.split(":")
    assert (DOCKER / src).resolve() == NGINX_CONF.resolve() and target == "/etc/nginx/nginx.conf" and mode == "ro"
    assert lb["depends_on"]["treespec"]["condition"] == "service_healthy"
    # nginx reaches each replica by the service name on the server's own port.
    port = svc["treespec"]["environment"]["TREESPEC_PORT"]
    assert nginx_upstream_hosts() == [f"treespec:{port}"]
    assert re.search(rf"^\s*listen\s+{port};", NGINX_CONF.read_text(), re.M)
    # Prometheus reads the replicas' config, which discovers every replica by that name.
    prom = svc["prometheus"]
    replicas_cfg = DOCKER / "prometheus" / "prometheus-replicas.yml"
    mounts = {(DOCKER / v.split(":")[0]).resolve(): v.split(":")[1] for v in prom["volumes"] if v.startswith(".")}
    assert mounts == {replicas_cfg.resolve(): "/etc/prometheus/prometheus.yml"}
    assert any(v.startswith("prometheus-data:") for v in prom["volumes"])
    (job,) = yaml.safe_load(replicas_cfg.read_text())["scrape_configs"]
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["treespec"] and sd["type"] == "A" and str(sd["port"]) == port


def test_nginx_config_streams_and_retries_only_what_is_safe():
    text = NGINX_CONF.read_text()
    directives = {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s*(\w+)\s+([^;{]*);", text, re.M)}
    assert directives["proxy_buffering"] == "off"
    assert "least_conn" in re.findall(r"^\s*(\w+);", text, re.M)
    # A 429 and a refused connection go to the next replica, POST included; a timeout never
    # does (the generation may be running).
    assert set(directives["proxy_next_upstream"].split()) == {"error", "http_429", "non_idempotent"}
    assert "max_fails=0" in text, "a replica's 429 must not take it out of rotation"
    assert int(directives["proxy_read_timeout"].rstrip("s")) >= 300


@needs_prometheus
def test_promtool_accepts_the_replicas_prometheus_config():
    promtool = shutil.which("promtool")
    r = subprocess.run([promtool, "check", "config", str(DOCKER / "prometheus" / "prometheus-replicas.yml")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dashboard_sums_over_replicas_and_can_show_each():
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    inst = variables["instance"]
    assert inst["includeAll"] and inst["multi"] and "instance" in inst["definition"]
    panels = [p for p in DASHBOARD["panels"] if p["type"] != "row"]
    for p in panels:
        for t in p["targets"]:
            for selector in re.findall(r"treespec_\w+(\{[^}]*\})?", t["expr"]):
                assert 'instance=~"$instance"' in selector, (p["title"], t["expr"])
    per_replica = [p for p in panels if "per replica" in p["title"].lower()]
    assert per_replica and all("by (instance)" in t["expr"] and "{{instance}}" in t["legendFormat"]
                               for p in per_replica for t in p["targets"])


# ---------------------------------------------------------------- nginx in front of two replicas

def nginx_conf_for(upstreams: list[int], listen: int, pid: Path) -> str:
    """The shipped nginx.conf with only its "loopback:" lines changed."""
    out, seen = [], set()
    for line in NGINX_CONF.read_text().splitlines():
        if "# loopback: upstream servers" in line:
            params = re.match(r"\s*server\s+\S+\s*(.*?);", line).group(1)
            out += [f"        server 127.0.0.1:{p} {params};" for p in upstreams]
            seen.add("upstream")
        elif "# loopback: listen" in line:
            out.append(f"        listen 127.0.0.1:{listen};")
            seen.add("listen")
        elif "# loopback: pid" in line:
            out.append(f"pid {pid};")
            seen.add("pid")
        else:
            out.append(line)
    assert seen == {"upstream", "listen", "pid"}, seen
    return "\n".join(out) + "\n"


class Fleet:
    def __init__(self, url: str, replicas: list, nginx: subprocess.Popen, log: Path):
        self.url, self.replicas, self.nginx, self.log = url, replicas, nginx, log


def port_of(server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def start_fleet(tmp: Path, running: int = 1, waiting: int = 0):
    """Two replicas (by default one running slot and no waiting room, so a busy one answers 429
    at once) and the nginx configuration in front of them."""
    from treespec.model import save_bundle
    from treespec.model.tokenizer import find_ranks_file

    bundle = save_bundle(tmp / "bundle", tiny_model(), find_ranks_file())
    env = {"TREESPEC_MAX_WAITING": str(waiting), "TREESPEC_DEBUG_FAULTS": "1", "TREESPEC_THREADS": "1",
           "TREESPEC_DTYPE": "float32", "TREESPEC_DEFAULT_DRAFTER": "none"}
    replicas = [start_server(bundle, "--max-running", str(running), env=env) for _ in range(2)]
    port = free_port()
    (tmp / "nginx.conf").write_text(nginx_conf_for([port_of(r) for r in replicas], port, tmp / "nginx.pid"))
    log = tmp / "nginx.log"
    return bundle, replicas, port, log


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fleet")
    _, replicas, port, log = start_fleet(tmp)
    url = f"http://127.0.0.1:{port}"
    try:
        with running([NGINX, "-c", str(tmp / "nginx.conf"), "-p", str(tmp), "-e", "stderr",
                      "-g", "daemon off;"], log) as proc:
            wait_until(lambda: httpx.get(url + "/health", timeout=2).status_code == 200, 30,
                       "nginx to pass /health through", proc, log)
            yield Fleet(url, replicas, proc, log)
    finally:
        for r in replicas:
            stop_server(r)


def metrics_of(server) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(server.url + "/metrics", timeout=10)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def successes(server) -> float:
    return total(metrics_of(server), "treespec_request_success_total")


def overloaded(server) -> float:
    return total(metrics_of(server), "treespec_request_failure_total", reason="overloaded")


def wait_running(server, n: int) -> None:
    wait_until(lambda: total(metrics_of(server), "treespec_requests_running") == n, 20, f"{n} running on {server.url}")


def wait_idle(server) -> None:
    wait_until(lambda: total(metrics_of(server), "treespec_requests_running") == 0, 30, f"{server.url} to be idle")


SHORT = {"inputs": "the cat sat", "parameters": {"max_new_tokens": 2}}
SLOW = {"inputs": "[[slow]] the cat sat", "parameters": {"max_new_tokens": 40}}  # 50 ms a step: ~2 s


@needs_nginx
def test_requests_spread_over_both_replicas(fleet):
    before = [successes(r) for r in fleet.replicas]
    with httpx.Client(base_url=fleet.url, timeout=30) as c:
        codes = [c.post("/generate", json=SHORT).status_code for _ in range(8)]
    assert codes == [200] * 8
    moved = [successes(r) - b for r, b in zip(fleet.replicas, before)]
    assert sum(moved) == 8 and min(moved) >= 2, moved  # each replica's own counters moved


@needs_nginx
def test_a_full_replicas_429_is_retried_on_the_other(fleet):
    a, b = fleet.replicas
    for r in fleet.replicas:
        wait_idle(r)
    busy = []
    hold = threading.Thread(target=lambda: busy.append(httpx.post(a.url + "/generate", json=SLOW, timeout=60).status_code))
    hold.start()  # straight to replica a, not through nginx: a is now full
    wait_running(a, 1)
    a429, b_ok = overloaded(a), successes(b)
    with httpx.Client(base_url=fleet.url, timeout=30) as c:
        codes = [c.post("/generate", json=SHORT).status_code for _ in range(4)]
    still_busy = total(metrics_of(a), "treespec_requests_running") == 1
    hold.join()
    assert still_busy, "replica a finished before the requests were sent; the test proves nothing"
    assert codes == [200] * 4  # the client never saw a 429
    assert overloaded(a) - a429 >= 1  # some went to a first, got 429, and were sent on to b
    assert successes(b) - b_ok == 4 and busy == [200]

    # With both replicas full, the client gets the last 429, with its Retry-After.
    holds = [threading.Thread(target=lambda r=r: httpx.post(r.url + "/generate", json=SLOW, timeout=60))
             for r in fleet.replicas]
    for t in holds:
        t.start()
    for r in fleet.replicas:
        wait_running(r, 1)
    full = httpx.post(fleet.url + "/generate", json=SHORT, timeout=30)
    for t in holds:
        t.join()
    assert full.status_code == 429 and full.headers["retry-after"] == "1"


@needs_nginx
def test_a_stream_passes_through_unbuffered(fleet):
    for r in fleet.replicas:
        wait_idle(r)
    t0 = time.monotonic()
    arrivals = []
    with httpx.stream("POST", fleet.url + "/generate_stream", json=SLOW, timeout=60) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data:"):
                arrivals.append(time.monotonic() - t0)
    assert len(arrivals) >= 20
    # 50 ms a step on the replica: buffered, every event would arrive at the end.
    assert arrivals[0] < arrivals[-1] - 1.0, (arrivals[0], arrivals[-1])


@needs_nginx
def test_a_replica_killed_under_load(tmp_path, capsys):
    """A bounded load (2 clients, 40 requests each at most, 20 s at most) through nginx; one
    replica is killed (SIGKILL) a third of the way in. Requests sent after the kill all reach
    the other replica (room for both clients there); what the clients saw is counted and printed."""
    _, replicas, port, log = start_fleet(tmp_path, running=2, waiting=2)
    url = f"http://127.0.0.1:{port}"
    victim, survivor = replicas
    results = []  # (start, end, outcome)
    lock = threading.Lock()
    killed_at: list[float] = []
    body = {"inputs": "[[slow]] the cat", "parameters": {"max_new_tokens": 4}}  # ~0.2 s each

    def client():
        with httpx.Client(base_url=url, timeout=30) as c:
            deadline = time.monotonic() + 20
            for _ in range(40):
                if time.monotonic() > deadline:
                    break
                t0 = time.monotonic()
                try:
                    outcome = str(c.post("/generate", json=body).status_code)
                except httpx.HTTPError as e:
                    outcome = type(e).__name__
                with lock:
                    results.append((t0, time.monotonic(), outcome))

    try:
        with running([NGINX, "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path), "-e", "stderr",
                      "-g", "daemon off;"], log) as proc:
            wait_until(lambda: httpx.get(url + "/health", timeout=2).status_code == 200, 30, "nginx", proc, log)
            clients = [threading.Thread(target=client) for _ in range(2)]
            for t in clients:
                t.start()
            wait_until(lambda: len(results) >= 25, 20, "a third of the load")
            killed_at.append(time.monotonic())
            victim.proc.send_signal(signal.SIGKILL)
            for t in clients:
                t.join()
    finally:
        if victim.proc.poll() is None:
            victim.proc.kill()
        stop_server(survivor)
    counts: dict[str, int] = {}
    for _, _, outcome in results:
        counts[outcome] = counts.get(outcome, 0) + 1
    after = [o for start, _, o in results if start > killed_at[0]]
    in_flight = [o for start, end, o in results if start <= killed_at[0] < end]
    with capsys.disabled():
        print(f"\n[replica killed under load] {len(results)} requests: {counts}; "
              f"{len(in_flight)} in flight at the kill: {in_flight}; {len(after)} sent after it: "
              f"{sorted(set(after))}")
    assert after and all(o == "200" for o in after)  # nginx sends new requests to the survivor
    assert sum(o != "200" for _, _, o in results) <= len(in_flight) <= 2  # only in-flight ones can fail


# ---------------------------------------------------------------- Prometheus over the replicas

@needs_prometheus
@needs_nginx
def test_prometheus_scrapes_every_replica(fleet, tmp_path):
    cfg = yaml.safe_load((DOCKER / "prometheus" / "prometheus-replicas.yml").read_text())
    cfg["global"]["scrape_interval"] = cfg["global"]["evaluation_interval"] = "1s"
    (job,) = cfg["scrape_configs"]
    del job["dns_sd_configs"]  # Docker's DNS lists the replicas; here the test does
    job["static_configs"] = [{"targets": [f"127.0.0.1:{port_of(r)}" for r in fleet.replicas]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    with running_prometheus(tmp_path) as (base, proc, log):
        def both_up() -> bool:
            res = prom_query(base, 'sum(up{job="treespec"})')
            return bool(res) and float(res[0]["value"][1]) == 2

        wait_until(both_up, 30, "both replicas scraped", proc, log)
        with httpx.Client(base_url=fleet.url, timeout=30) as c:
            for _ in range(6):
                assert c.post("/generate", json=SHORT).status_code == 200
        want = {f"127.0.0.1:{port_of(r)}": successes(r) for r in fleet.replicas}

        def caught_up() -> bool:
            res = prom_query(base, 'sum by (instance) (treespec_request_success_total{job="treespec"})')
            return {s["metric"]["instance"]: float(s["value"][1]) for s in res} == want

        wait_until(caught_up, 30, "prometheus to scrape both replicas' counters", proc, log)
        # The dashboard's per-replica panel shows one series per replica.
        (panel,) = [p for p in DASHBOARD["panels"] if p["title"] == "Requests running / waiting per replica"]
        res = prom_query(base, as_promql(panel["targets"][0]["expr"]))
        assert {s["metric"]["instance"] for s in res} == set(want)


# ---------------------------------------------------------------- Kubernetes manifests

K8S = DOCKER / "k8s"
KUSTOMIZATION = yaml.safe_load((K8S / "kustomization.yaml").read_text())
MANIFESTS = {doc["kind"]: doc for name in KUSTOMIZATION["resources"]
             for doc in yaml.safe_load_all((K8S / name).read_text())}
CORE_KINDS = ("Deployment", "Service", "PodDisruptionBudget")


def container() -> dict:
    (c,) = MANIFESTS["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def container_env() -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container()["env"]}


@pytest.mark.parametrize("kind", CORE_KINDS)
def test_kubernetes_manifests_validate_against_the_kubernetes_schemas(kind):
    """Offline, against the schemas kubernetes-validate ships, strictly (no unknown fields)."""
    import kubernetes_validate

    kubernetes_validate.validate(MANIFESTS[kind], kubernetes_validate.utils.latest_version(), strict=True)


def test_kubernetes_manifests_agree_with_each_other_and_the_app(tmp_path):
    from dataclasses import fields

    from treespec.server.app import build_app
    from treespec.server.settings import ENV_PREFIX, Settings, load_settings

    assert set(MANIFESTS) == {*CORE_KINDS, "ScaledObject"}
    dep, svc, pdb = MANIFESTS["Deployment"], MANIFESTS["Service"], MANIFESTS["PodDisruptionBudget"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items() and pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # Ports: the container's, the server's setting, the Service's target, the scrape annotation, the probes.
    c, env = container(), container_env()
    (port,) = c["ports"]
    assert str(port["containerPort"]) == env["TREESPEC_PORT"]
    (sp,) = svc["spec"]["ports"]
    assert sp["targetPort"] in (port["name"], port["containerPort"])
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/port"] == env["TREESPEC_PORT"]
    app = build_app(Settings(bundle=str(tmp_path)), load=False)
    gets = route_paths(app, "get")
    assert ann["prometheus.io/path"] in gets
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/health" and get["path"] in gets and get["port"] in (port["name"], port["containerPort"])
    # A drain is slower than the liveness probe's patience, or the kubelet would restart a
    # pod that is finishing its requests (/health answers 503 from the start of shutdown).
    assert c["livenessProbe"]["periodSeconds"] * c["livenessProbe"]["failureThreshold"] > \
        dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # Every TREESPEC_* variable is a real setting with a valid value, threads match the CPU request.
    known = {ENV_PREFIX + f.name.upper() for f in fields(Settings)}
    ours = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX) and v is not None}
    assert set(env) <= known, set(env) - known
    s = load_settings(environ=ours)
    assert s.host == "0.0.0.0" and int(env["TREESPEC_THREADS"]) == int(c["resources"]["requests"]["cpu"])
    assert c["resources"]["requests"]["cpu"] == c["resources"]["limits"]["cpu"]
    # The grace period covers preStop, the server's drain and its shutdown.
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= pre_stop + s.graceful_timeout_s + 5
    # The API key comes from a Secret, and the routes stay open without it.
    (key,) = [e for e in c["env"] if e["name"] == "TREESPEC_API_KEY"]
    assert key["valueFrom"]["secretKeyRef"]["optional"] is True
    # The image default matches the Dockerfile's user and bundle.
    assert dep["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001
    assert env["TREESPEC_BUNDLE"] == "/opt/treespec/models/default"
    so = MANIFESTS["ScaledObject"]
    assert so["apiVersion"] == "keda.sh/v1alpha1" and so["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert 1 <= so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"]


@needs_nginx
def test_the_autoscalers_metric_is_in_live_metrics(fleet):
    (trigger,) = MANIFESTS["ScaledObject"]["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and float(trigger["metadata"]["threshold"]) > 0
    names = set(re.findall(r"\btreespec_\w+", trigger["metadata"]["query"]))
    assert names == {"treespec_requests_waiting"}
    live = metrics_of(fleet.replicas[0])
    assert any(n == "treespec_requests_waiting" for n, _ in live)
