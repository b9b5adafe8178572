"""docker/ verified natively: no Docker engine runs here, so every piece the
compose stack relies on is checked on its own.

- The compose file, Dockerfile and .dockerignore are parsed: every file they
  name exists, ports and settings agree, the image installs the project the
  way the Makefile and README do.
- promtool accepts the Prometheus config and every dashboard query.
- A real ``treespec serve`` (tiny bundle, uvicorn on 127.0.0.1) answers the
  healthcheck command taken verbatim from the Dockerfile, and its /metrics
  holds every metric name the dashboard queries.
- A real Prometheus (Debian's binary) runs the compose config with only the
  target and intervals changed, scrapes that server while it serves
  speculative requests, and answers the dashboard's own acceptance-rate and
  TTFT queries with sane values.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import route_paths, tiny_model

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
# Series of the whole server, not of one drafter: no drafter label.
MACHINE_WIDE = {"treespec_batch_size_sum", "treespec_batch_size_count", "treespec_batch_tokens_sum",
                "treespec_batch_tokens_count", "treespec_cpu_busy_other_processes"}
DASHBOARD = json.loads((DOCKER / "grafana" / "dashboards" / "treespec.json").read_text())
PROM_CONFIG = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package `prometheus`; .ci/run installs it)")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus not installed (Debian package `prometheus`; .ci/run installs it)")


# ---------------------------------------------------------------- parsing helpers

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


DOCKERFILE = dockerfile_instructions((DOCKER / "Dockerfile").read_text())


def instr(name: str) -> list[str]:
    return [args for word, args in DOCKERFILE if word == name]


def dockerfile_env() -> dict[str, str]:
    env = {}
    for args in instr("ENV"):
        for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', args):
            env[key] = value.strip('"')
    return env


def dockerfile_args() -> dict[str, str]:
    return dict(a.partition("=")[::2] for a in instr("ARG"))


def dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    """(negated, regex) per line of .dockerignore, Docker's matching rules:
    `*` stays inside one path element, `**` spans any number, the last
    matching line wins, and a line that matches a folder covers its contents."""
    pats = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        line = line.lstrip("!").strip("/")
        rx = ""
        i = 0
        while i < len(line):
            if line.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3
            elif line.startswith("**", i):
                rx, i = rx + ".*", i + 2
            elif line[i] == "*":
                rx, i = rx + "[^/]*", i + 1
            elif line[i] == "?":
                rx, i = rx + "[^/]", i + 1
            else:
                rx, i = rx + re.escape(line[i]), i + 1
        pats.append((neg, re.compile(rx + "(?:/.*)?")))
    return pats


def dockerignored(rel: str) -> bool:
    ignored = False
    for neg, rx in dockerignore_patterns():
        if rx.fullmatch(rel):
            ignored = not neg
    return ignored


def compose_env(service: str) -> dict[str, str]:
    """The service's environment as Docker Compose resolves it with no .env
    file: ${VAR:-default} becomes the default."""
    env = COMPOSE["services"][service].get("environment", {})
    if isinstance(env, list):
        env = dict(e.partition("=")[::2] for e in env)
    return {k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v)) for k, v in env.items()}


def healthcheck_code_dockerfile() -> str:
    (hc,) = instr("HEALTHCHECK")
    m = re.search(r'CMD python -c "(.*)"$', hc)
    assert m, f"HEALTHCHECK should run `python -c \"...\"` (the slim image has no curl): {hc}"
    return m.group(1)


def healthcheck_code_compose() -> str:
    test = COMPOSE["services"]["treespec"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"], test
    return test[3]


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query in the dashboard."""
    out = []
    for p in DASHBOARD["panels"]:
        for t in p.get("targets", []):
            out.append((p["title"], t["expr"]))
    return out


def as_promql(expr: str, rate_interval: str = "1m", drafter: str = ".*", instance: str = ".*") -> str:
    """A dashboard query as Grafana sends it: template variables filled in."""
    return (expr.replace("$__rate_interval", rate_interval).replace("$drafter", drafter)
            .replace("$instance", instance))


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\btreespec_[a-zA-Z0-9_]+", expr))


def query(title_part: str) -> list[str]:
    exprs = [e for t, e in dashboard_targets() if title_part.lower() in t.lower()]
    assert exprs, f"no dashboard panel titled like {title_part!r}"
    return exprs


# ---------------------------------------------------------------- static checks

def test_compose_references_existing_files():
    svc = COMPOSE["services"]
    build = svc["treespec"]["build"]
    context = (DOCKER / build["context"]).resolve()
    assert context == REPO, "the image is built from the repository root (COPY paths are relative to it)"
    assert (context / build["dockerfile"]).is_file()
    mounts = {}
    for name, s in svc.items():
        for v in s.get("volumes", []):
            src, _, rest = v.partition(":")
            target = rest.split(":")[0]
            if src.startswith("."):
                assert (DOCKER / src).exists(), f"{name} mounts {src}, which does not exist"
                mounts[(DOCKER / src).resolve()] = target
            else:
                assert src in COMPOSE.get("volumes", {}), f"{name}: named volume {src} is not declared"
    # Prometheus reads the mounted config.
    prom_target = mounts[(DOCKER / "prometheus" / "prometheus.yml").resolve()]
    assert f"--config.file={prom_target}" in svc["prometheus"]["command"]
    # Grafana: provisioning mounted where Grafana looks, and the dashboard
    # provider points at where the dashboards folder is mounted.
    prov = DOCKER / "grafana" / "provisioning"
    assert mounts[prov.resolve()] == "/etc/grafana/provisioning"
    (provider,) = yaml.safe_load((prov / "dashboards" / "treespec.yml").read_text())["providers"]
    dash_target = mounts[(DOCKER / "grafana" / "dashboards").resolve()]
    assert provider["options"]["path"] == dash_target
    home = compose_env("grafana")["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(dash_target + "/")
    assert (DOCKER / "grafana" / "dashboards" / Path(home).name).is_file()


def test_grafana_datasource_is_the_compose_prometheus_and_the_dashboard_uses_it():
    (ds,) = yaml.safe_load(
        (DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert ds["type"] == "prometheus"
    m = re.fullmatch(r"http://([\w-]+):(\d+)", ds["url"])
    assert m and m.group(1) in COMPOSE["services"], ds["url"]
    published = [p.split(":")[-1] for p in COMPOSE["services"][m.group(1)]["ports"]]
    assert m.group(2) in published
    used = {json.dumps(p.get("datasource")) for p in DASHBOARD["panels"] if p["type"] != "row"}
    used |= {json.dumps(t["datasource"]) for p in DASHBOARD["panels"] for t in p.get("targets", [])}
    assert used == {json.dumps({"type": "prometheus", "uid": ds["uid"]})}


def test_prometheus_scrapes_the_treespec_service():
    (job,) = PROM_CONFIG["scrape_configs"]
    (target,) = [t for sc in job["static_configs"] for t in sc["targets"]]
    host, port = target.split(":")
    assert host in COMPOSE["services"]
    env = compose_env("treespec")
    assert port == env["TREESPEC_PORT"] == dockerfile_env()["TREESPEC_PORT"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert f"8000:{port}" in COMPOSE["services"]["treespec"]["ports"]
    assert port in instr("EXPOSE")


def test_treespec_service_has_healthcheck_restart_and_limits():
    s = COMPOSE["services"]["treespec"]
    assert s["restart"] in ("always", "unless-stopped", "on-failure")
    limits = s["deploy"]["resources"]["limits"]
    assert float(limits["cpus"]) > 0 and re.fullmatch(r"\d+[MG]", limits["memory"])
    # One check, two places: compose overrides the image's HEALTHCHECK, so they must agree.
    assert healthcheck_code_compose() == healthcheck_code_dockerfile()
    assert "/health'" in healthcheck_code_dockerfile()


def test_settings_in_compose_and_dockerfile_are_real_server_settings():
    from treespec.server.settings import ENV_PREFIX, Settings, load_settings
    from dataclasses import fields

    known = {ENV_PREFIX + f.name.upper() for f in fields(Settings)}
    for where, env in (("docker-compose.yml", compose_env("treespec")), ("Dockerfile", dockerfile_env())):
        ours = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
        assert set(ours) <= known, f"{where} sets unknown settings {set(ours) - known}"
        s = load_settings(environ=ours)  # raises SettingsError on a bad value
        assert s.host == "0.0.0.0", f"{where}: inside a container the server must listen on all interfaces"
        assert s.port == 8000
        assert s.api_key is None, f"{where}: an empty TREESPEC_API_KEY must leave the routes open"


def test_dockerfile_shape():
    froms = instr("FROM")
    assert len(froms) >= 2, "multi-stage: build the venv in one stage, copy it into a clean one"
    base = dockerfile_args()["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base), base
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.11"
    assert "--from=build /opt/venv" in " ".join(instr("COPY"))
    (user,) = instr("USER")
    assert user not in ("root", "0")
    assert any(f"useradd" in r and user in r for r in instr("RUN"))
    assert json.loads(instr("CMD")[0])[:2] == ["treespec", "serve"]


def test_dockerfile_installs_like_the_makefile_and_readme():
    make = (REPO / "Makefile").read_text()
    torch_pin = re.search(r"^TORCH\s*\?=\s*(\S+)", make, re.M).group(1)
    recipe = re.search(r"^\$\(STAMP\):.*\n((?:\t.*\n)+)", make, re.M).group(1)
    make_pips = [line for line in recipe.splitlines() if "pip install" in line]
    # The Makefile: the pinned torch first, then the project.
    assert '"$(TORCH)"' in make_pips[0] and '".[test]"' in make_pips[1]
    readme = (REPO / "README.md").read_text()
    assert torch_pin in readme, "the README documents the torch pin"

    assert dockerfile_args()["TORCH"] == torch_pin
    runs = instr("RUN")
    pips = [i for i, r in enumerate(runs) if "pip install" in r and "apt-get" not in r]
    torch_step, project_step = runs[pips[0]], runs[pips[1]]
    assert len(pips) == 2
    assert torch_step.endswith('"$TORCH"'), torch_step
    # The same pin from PyTorch's CPU-only index by default (pip's default index serves Linux
    # the CUDA build); compose passes the same default, and an empty value means pip's own.
    cpu_index = "https://download.pytorch.org/whl/cpu"
    assert dockerfile_args()["TORCH_INDEX_URL"] == cpu_index
    assert COMPOSE["services"]["treespec"]["build"]["args"]["TORCH_INDEX_URL"] == "${TORCH_INDEX_URL:-%s}" % cpu_index
    assert "${TORCH_INDEX_URL:+" in torch_step
    assert re.fullmatch(r"python -m pip install \.", project_step), project_step
    # Everything `pip install .` reads is copied before it runs.
    copies_before = [c for word, c in DOCKERFILE[:DOCKERFILE.index(("RUN", project_step))] if word == "COPY"]
    copied = {part for c in copies_before for part in c.split()[:-1]}
    pkg_dirs = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    assert pkg_dirs | {"pyproject.toml", "README.md"} <= copied


def test_image_install_step_builds_every_module(tmp_path):
    """`pip install .` run on exactly what the Dockerfile copies before it
    (as a wheel, which is what pip installs) holds every module of the
    project, including every CLI subcommand: a new top-level folder that the
    Dockerfile does not copy would be missing from the image."""
    import zipfile

    from treespec.cli import COMMANDS

    (project_step,) = [i for i, (w, a) in enumerate(DOCKERFILE) if w == "RUN" and a == "python -m pip install ."]
    src = tmp_path / "src"
    src.mkdir()
    for word, args in DOCKERFILE[:project_step]:
        if word != "COPY" or "--from=" in args:
            continue
        for name in args.split()[:-1]:
            copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
            copy(REPO / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                        "--wheel-dir", str(tmp_path / "wheel"), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = (tmp_path / "wheel").glob("treespec-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    package_dirs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for package, folder in package_dirs.items():
        for py in sorted((REPO / folder).rglob("*.py")):  # subpackages too (server/routes/)
            rel = py.relative_to(REPO / folder).as_posix()
            want = package.replace(".", "/") + "/" + rel
            assert want in names, f"{folder}/{rel} would be missing from the image"
    for name, module in COMMANDS.items():
        assert module.replace(".", "/") + ".py" in names, f"`treespec {name}` ({module}) would be missing from the image"


def test_copied_files_exist_and_are_not_dockerignored():
    for rel in (".venv", ".venv/bin/python", "data/default", "runs/default/ckpt.pt", ".git/HEAD",
                "server/__pycache__/app.cpython-311.pyc", "models/other/model.safetensors"):
        assert dockerignored(rel), f".dockerignore should keep {rel} out of the build context"
    for word, args in DOCKERFILE:
        if word != "COPY" or "--from=" in args:
            continue
        for src in [a for a in args.split() if not a.startswith("--")][:-1]:
            assert not dockerignored(src), f"COPY {src}: excluded by .dockerignore, the build would fail"
            if src == "models/default" and not (REPO / src).exists():
                continue  # checked (and skipped with a reason) below
            assert (REPO / src).exists(), f"COPY {src}: no such file in the repository"


def test_default_bundle_is_there_for_the_image():
    from treespec.model.bundle import REQUIRED_FILES

    (copy,) = [c for c in instr("COPY") if "models/default" in c]
    dest = copy.split()[-1]
    assert dockerfile_env()["TREESPEC_BUNDLE"] == dest == compose_env("treespec")["TREESPEC_BUNDLE"]
    bundle = REPO / "models" / "default"
    for f in REQUIRED_FILES:
        assert (bundle / f).is_file(), f"models/default lacks {f}"


@needs_promtool
def test_promtool_accepts_the_prometheus_config():
    r = subprocess.run([PROMTOOL, "check", "config", str(DOCKER / "prometheus" / "prometheus.yml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_promtool_parses_every_dashboard_query(tmp_path):
    # Each query becomes a recording rule: promtool parses its PromQL.
    rules = [{"record": f"dashboard:q{i}", "expr": as_promql(e)} for i, (_, e) in enumerate(dashboard_targets())]
    var = DASHBOARD["templating"]["list"][0]
    rules.append({"record": "dashboard:var", "expr": re.fullmatch(r"label_values\((\w+), drafter\)",
                                                                   var["definition"]).group(1)})
    f = tmp_path / "rules.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run([PROMTOOL, "check", "rules", str(f)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dashboard_has_the_panels_the_issue_asks_for():
    need = {
        "acceptance rate": {"treespec_spec_decode_num_accepted_tokens_total", "treespec_spec_decode_num_draft_tokens_total"},
        "mean acceptance length": {"treespec_spec_decode_num_accepted_tokens_total"},
        "per draft position": {"treespec_spec_decode_num_accepted_tokens_per_pos_total"},
        "handbacks": {"treespec_spec_decode_model_handbacks_total"},
        "tokens/s": {"treespec_generation_tokens_total"},
        "time to first token": {"treespec_time_to_first_token_seconds_bucket"},
        "inter-token latency": {"treespec_inter_token_latency_seconds_bucket"},
        "running / waiting": {"treespec_requests_running", "treespec_requests_waiting"},
        "429": {"treespec_request_failure_total"},
    }
    for title, metrics in need.items():
        exprs = query(title)
        assert metrics <= set().union(*map(metric_names, exprs)), (title, exprs)
    for title in ("time to first token", "inter-token latency"):
        qs = " ".join(query(title))
        assert "histogram_quantile(0.5," in qs and "histogram_quantile(0.99," in qs
    # By drafter: every query filters on the dashboard's drafter variable and
    # every non-failure panel splits by it, except the machine-wide ones: a batch
    # mixes drafters, and the CPU is shared by all, so those series have no
    # drafter label to filter on.
    batching = {"treespec_batch_size_sum", "treespec_batch_size_count", "treespec_batch_tokens_sum",
                "treespec_batch_tokens_count"}
    assert batching <= set().union(*map(metric_names, query("batching")))
    assert MACHINE_WIDE - batching <= set().union(*map(metric_names, query("other processes")))
    for title, e in dashboard_targets():
        if metric_names(e) <= MACHINE_WIDE:
            assert "drafter" not in e, (title, e)
            continue
        assert 'drafter=~"$drafter"' in e, (title, e)
        if "429" not in title and "per replica" not in title:  # per replica: split by instance instead
            assert "drafter" in re.findall(r"by \(([^)]*)\)", e)[0], (title, e)


# ---------------------------------------------------------------- a live server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited with {proc.returncode}\n"
                                 + (log.read_text()[-4000:] if log else ""))
        try:
            if pred():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n" + (log.read_text()[-4000:] if log else ""))


@contextmanager
def running(cmd: list[str], log: Path, env: dict | None = None):
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Server:
    def __init__(self, url: str, port: int, proc: subprocess.Popen):
        self.url, self.port, self.proc = url, port, proc

    def generate(self, text: str, **params) -> dict:
        r = httpx.post(self.url + "/generate", json={"inputs": text, "parameters": params}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    def metrics(self) -> dict[tuple[str, tuple], float]:
        from prometheus_client.parser import text_string_to_metric_families

        r = httpx.get(self.url + "/metrics", timeout=10)
        assert r.status_code == 200
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def total(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items()
               if n == name and all(dict(ls).get(k) == val for k, val in labels.items()))


# Text that repeats, so the n-gram drafter finds matches and proposes drafts.
PROMPT = "the cat sat on the mat. the cat sat on the mat. the cat sat on the"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from treespec.model import save_bundle
    from treespec.model.tokenizer import find_ranks_file

    tmp = tmp_path_factory.mktemp("deploy")
    bundle = save_bundle(tmp / "bundle", tiny_model(), find_ranks_file())
    port = free_port()
    # Settings the way the image passes them: environment variables only, no flags.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TREESPEC_")}
    env.update(TREESPEC_BUNDLE=str(bundle), TREESPEC_HOST="127.0.0.1", TREESPEC_PORT=str(port),
               TREESPEC_THREADS="1", TREESPEC_LOG_LEVEL="warning")
    log = tmp / "server.log"
    with running([sys.executable, "-m", "treespec.cli", "serve"], log, env) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(url + "/health", timeout=2).status_code == 200, 120,
                   "treespec serve to become healthy", proc, log)
        yield Server(url, port, proc)


def run_healthcheck(port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "TREESPEC_PORT": str(port)}
    return subprocess.run([sys.executable, "-c", healthcheck_code_dockerfile()], env=env,
                          capture_output=True, text=True, timeout=30)


def test_healthcheck_command_passes_on_a_live_server_and_fails_without_one(server):
    assert run_healthcheck(server.port).returncode == 0
    assert run_healthcheck(free_port()).returncode == 1  # nothing listens there: the urlopen error exits 1


def test_healthcheck_command_fails_while_the_model_loads(tmp_path):
    """/health answers 503 until the bundle is loaded: the image must report
    "starting"/"unhealthy" then, not healthy."""
    import threading

    import uvicorn

    from treespec.server.app import build_app
    from treespec.server.settings import Settings

    port = free_port()
    app = build_app(Settings(bundle=str(tmp_path / "never-loaded"), port=port), load=False)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    try:
        wait_until(lambda: srv.started, 30, "uvicorn to start")
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 503
        r = run_healthcheck(port)
        assert r.returncode == 1 and "503" in r.stderr, r.stderr
    finally:
        srv.should_exit = True
        t.join(timeout=30)


def test_healthcheck_and_scrape_paths_are_server_routes(tmp_path):
    from treespec.server.app import build_app
    from treespec.server.settings import Settings

    app = build_app(Settings(bundle=str(tmp_path)), load=False)
    gets, posts = route_paths(app, "get"), route_paths(app, "post")
    health = re.search(r"%s(/\w+)'", healthcheck_code_dockerfile()).group(1)
    assert health in gets
    (job,) = PROM_CONFIG["scrape_configs"]
    assert job.get("metrics_path", "/metrics") in gets
    # The routes docs/deploy.md and the compose header promise on port 8000.
    for text in ((REPO / "docs" / "deploy.md").read_text(), (DOCKER / "docker-compose.yml").read_text()):
        i, lines = next((i, ls) for ls in [text.splitlines()] for i, l in enumerate(ls)
                        if "8000" in l and "POST /generate" in l)
        line = lines[i] + (" " + lines[i + 1].lstrip("# ") if lines[i].rstrip().endswith(",") else "")
        post_part, get_part = line.split("POST", 1)[1].split("GET")
        assert set(re.findall(r"/[\w/]*", post_part)) == posts
        assert set(re.findall(r"/[\w/]*", get_part)) <= gets


# Families the dashboard queries whose series only appear once something
# specific happened: handbacks and corpus guesses need a bundle with a fitted tree drafter (the
# tiny test bundle has none), so for them the test requires the declaration
# (# HELP/# TYPE in /metrics) but not a sample.
TREE_ONLY = {"treespec_spec_decode_model_handbacks_total", "treespec_spec_decode_num_guess_tokens_total",
             "treespec_spec_decode_num_accepted_guesses_total"}


def test_every_dashboard_metric_exists_in_live_metrics(server):
    from prometheus_client.parser import text_string_to_metric_families

    for drafter in ("ngram", "none"):
        for i in range(2):
            server.generate(PROMPT, max_new_tokens=12, drafter=drafter, seed=i)
    # One request the server refuses, so the failure counter has a series.
    r = httpx.post(server.url + "/generate", json={"inputs": "   "}, timeout=30)
    assert r.status_code == 422
    text = httpx.get(server.url + "/metrics", timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    used = set().union(*(metric_names(e) for _, e in dashboard_targets()))
    used |= metric_names(DASHBOARD["templating"]["list"][0]["definition"])
    suffix_type = {"_total": "counter", "_bucket": "histogram", "_sum": "histogram", "_count": "histogram"}
    for name in sorted(used):
        family, kind = name, "gauge"
        for suffix, t in suffix_type.items():
            if name.endswith(suffix):
                family, kind = name.removesuffix(suffix), t
        assert family in families, f"the dashboard queries {name}, which the server does not export"
        assert families[family].type == kind, f"{name}: the dashboard treats it as a {kind}, " \
                                              f"the server exports a {families[family].type}"
        if name in TREE_ONLY:
            continue
        drafters = {s.labels.get("drafter") for s in families[family].samples if s.name == name}
        assert drafters, f"{name} has no series after the requests"
        if name == "treespec_request_failure_total":
            continue  # a refused request may not have chosen a drafter
        if name in MACHINE_WIDE:
            assert drafters == {None}  # a batch mixes drafters, the CPU serves them all: no label
            continue
        # The none drafter drafts nothing, so only ngram has speculation series.
        want = {"ngram"} if "spec_decode" in name else {"ngram", "none"}
        assert want <= drafters, (name, drafters)


@contextmanager
def running_prometheus(tmp_path: Path):
    """Debian's Prometheus on a free loopback port with ``tmp_path/prometheus.yml``, once ready:
    (its URL, the process, its log)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "prometheus.log"
    cmd = [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
           f"--web.listen-address=127.0.0.1:{port}"]
    with running(cmd, log) as proc:
        wait_until(lambda: httpx.get(base + "/-/ready", timeout=2).status_code == 200, 60,
                   "prometheus to be ready", proc, log)
        yield base, proc, log


def prom_query(base: str, promql: str) -> list[dict]:
    r = httpx.get(base + "/api/v1/query", params={"query": promql}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (promql, body)
    return body["data"]["result"]


def by_drafter(result: list[dict]) -> dict[str, float]:
    return {s["metric"].get("drafter", ""): float(s["value"][1]) for s in result}


# $__rate_interval for the Prometheus test: longer than the whole test, so
# every sample since Prometheus started is inside the window even on a slow machine.
WINDOW = "5m"


@needs_prometheus
def test_real_prometheus_answers_the_dashboard_queries(server, tmp_path):
    # The compose config with only the target (and, to keep the test short, the
    # intervals) changed.
    cfg = json.loads(json.dumps(PROM_CONFIG))
    cfg["global"]["scrape_interval"] = cfg["global"]["evaluation_interval"] = "1s"
    (job,) = cfg["scrape_configs"]
    (sc,) = job["static_configs"]
    assert sc["targets"] == ["treespec:8000"]
    sc["targets"] = [f"127.0.0.1:{server.port}"]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))

    # Series with the ngram label exist before the first scrape, so rate() has a baseline.
    server.generate(PROMPT, max_new_tokens=8, drafter="ngram", seed=100)
    before = server.metrics()
    with running_prometheus(tmp_path) as (base, proc, log):
        def scraped_up() -> bool:
            res = prom_query(base, 'up{job="treespec"}')
            return bool(res) and res[0]["value"][1] == "1"

        wait_until(scraped_up, 30, "the first successful scrape of treespec", proc, log)
        time.sleep(1.5)  # a second baseline sample
        # Speculative traffic spread over several scrapes.
        details, walls = [], []
        for i in range(6):
            t0 = time.monotonic()
            details.append(server.generate(PROMPT, max_new_tokens=16, drafter="ngram", seed=i, details=True)["details"])
            walls.append(time.monotonic() - t0)
            time.sleep(0.4)
        after = server.metrics()
        spec = [d["speculative"] for d in details]
        assert sum(s["draft_tokens"] for s in spec) > 0, "the ngram drafter proposed nothing; the test prompt should repeat"

        # Wait until Prometheus has scraped the final counter values.
        want = total(after, "treespec_generation_tokens_total", drafter="ngram")

        def caught_up() -> bool:
            res = prom_query(base, 'sum(treespec_generation_tokens_total{drafter="ngram"})')
            return bool(res) and float(res[0]["value"][1]) == want

        wait_until(caught_up, 30, "prometheus to scrape the final counters", proc, log)
        time.sleep(1.5)

        # The dashboard's own acceptance-rate query.
        (acc_q,) = query("draft acceptance rate")
        acc = by_drafter(prom_query(base, as_promql(acc_q, WINDOW)))
        assert "ngram" in acc, acc
        d_acc = total(after, "treespec_spec_decode_num_accepted_tokens_total", drafter="ngram") - \
            total(before, "treespec_spec_decode_num_accepted_tokens_total", drafter="ngram")
        d_draft = total(after, "treespec_spec_decode_num_draft_tokens_total", drafter="ngram") - \
            total(before, "treespec_spec_decode_num_draft_tokens_total", drafter="ngram")
        assert d_draft == sum(s["draft_tokens"] for s in spec)
        assert d_acc == sum(s["accepted_tokens"] for s in spec)
        # rate()/rate() is the ratio of the increases: both series are scraped at the same
        # instants and existed before the first scrape, so both extrapolate by the same factor.
        assert acc["ngram"] == pytest.approx(d_acc / d_draft, rel=1e-6)

        # The dashboard's own TTFT p50 and p99 queries.
        ttft = [by_drafter(prom_query(base, as_promql(q, WINDOW))) for q in query("time to first token")]
        p50, p99 = ttft[0]["ngram"], ttft[1]["ngram"]
        assert math.isfinite(p50) and math.isfinite(p99), ttft
        # Every first token came within its request's wall time, so the p99 lies at or below the
        # histogram bucket that holds the slowest request.
        from treespec.server.metrics import _LATENCY

        assert 0.0 < p50 <= p99 <= min(b for b in _LATENCY if b >= max(walls)), (ttft, walls)

        # Mean acceptance length: tokens per verify step, as the responses report it.
        (tau_q,) = query("mean acceptance length")
        tau = by_drafter(prom_query(base, as_promql(tau_q, WINDOW)))["ngram"]
        d_verify = sum(s["verify_steps"] for s in spec)
        assert d_verify == total(after, "treespec_spec_decode_num_verify_steps_total", drafter="ngram") - \
            total(before, "treespec_spec_decode_num_verify_steps_total", drafter="ngram")
        assert math.isfinite(tau) and tau >= 1.0
        assert tau == pytest.approx((d_acc + d_verify) / d_verify, rel=0.1)
    assert proc.returncode is not None
