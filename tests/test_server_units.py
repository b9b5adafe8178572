"""Server pieces that need no running server: settings from TREESPEC_*,
request semantics, and /health's 503 before the bundle has loaded."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from treespec.server import protocol as P
from treespec.server.settings import Settings, SettingsError, load_settings


def test_settings_read_every_field_from_the_environment():
    env = {"TREESPEC_BUNDLE": "/b", "TREESPEC_PORT": "9001", "TREESPEC_API_KEY": "k", "TREESPEC_MAX_RUNNING": "3",
           "TREESPEC_MAX_WAITING": "0", "TREESPEC_CORS_ORIGINS": "http://a, http://b", "TREESPEC_DEBUG_FAULTS": "yes",
           "TREESPEC_GRACEFUL_TIMEOUT_S": "2.5", "TREESPEC_MODEL_NAME": ""}
    s = load_settings(environ=env)
    assert (s.bundle, s.port, s.api_key, s.max_running, s.max_waiting) == ("/b", 9001, "k", 3, 0)
    assert s.cors_origins == ["http://a", "http://b"] and s.debug_faults is True
    assert s.graceful_timeout_s == 2.5 and s.model_name is None
    # A flag beats the environment; a flag left out (None) does not.
    s = load_settings({"port": 7000, "max_running": None}, environ=env)
    assert s.port == 7000 and s.max_running == 3


def test_defaults_are_safe():
    s = Settings()
    assert s.host == "127.0.0.1" and s.api_key is None and s.cors_origins == [] and s.debug_faults is False


@pytest.mark.parametrize("env,words", [
    ({"TREESPEC_PORT": "eighty"}, "TREESPEC_PORT"),
    ({"TREESPEC_DEBUG_FAULTS": "maybe"}, "TREESPEC_DEBUG_FAULTS"),
    ({"TREESPEC_MAX_RUNNING": "0"}, "max_running"),
    ({"TREESPEC_DTYPE": "float16"}, "dtype"),
])
def test_bad_settings_are_refused_by_name(env, words):
    with pytest.raises(SettingsError, match=words):
        load_settings(environ=env)


def test_cli_flags_cover_every_setting():
    from treespec.cli import build_parser

    args = build_parser().parse_args(["serve", "--port", "1234", "--max-waiting", "5", "--cors-origins", "http://x",
                                      "--debug-faults", "--graceful-timeout", "1.5"])
    s = load_settings(vars(args), environ={})
    assert (s.port, s.max_waiting, s.cors_origins, s.debug_faults, s.graceful_timeout_s) == (
        1234, 5, ["http://x"], True, 1.5)
    for f in Settings.__dataclass_fields__:
        assert hasattr(args, f), f"no flag for setting {f}"


@pytest.mark.parametrize("params,temperature", [
    ({}, 0.0),  # TGI: greedy unless asked to sample
    ({"do_sample": True}, 1.0),
    ({"temperature": 0.7}, 0.7),  # setting a sampling knob turns sampling on, as in TGI
    ({"top_k": 5}, 1.0),
    ({"top_p": 0.9}, 1.0),
    ({"top_p": 1.0}, 0.0),
    ({"do_sample": True, "temperature": 0.0}, 0.0),  # temperature 0 is always greedy
])
def test_tgi_sampling_switch(params, temperature):
    assert P.GenerateParameters.model_validate(params).sampling_temperature() == temperature


def test_openai_defaults_to_sampling_at_temperature_one():
    assert P.CompletionRequest.model_validate({"prompt": "x"}).sampling_temperature() == 1.0
    assert P.CompletionRequest.model_validate({"prompt": "x", "temperature": 0}).sampling_temperature() == 0.0
    assert P.CompletionRequest.model_validate({"prompt": "x", "stop": "\n"}).stop == ["\n"]
    # One prompt or a batch, as text or token ids: prompts() is the batch.
    for prompt, batch in (("one", ["one"]), (["a", "b"], ["a", "b"]), ([5, 6], [[5, 6]]),
                          ([[5, 6], [7]], [[5, 6], [7]]), (["only"], ["only"])):
        assert P.CompletionRequest.model_validate({"prompt": prompt}).prompts() == batch


def test_health_is_503_until_the_bundle_has_loaded():
    from treespec.server.app import build_app

    app = build_app(Settings(), load=False)  # nothing loads: the state a starting server is in

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return (await c.get("/health"), await c.get("/info"),
                    await c.post("/generate", json={"inputs": "hi"}), await c.get("/metrics"))

    health, info, gen, metrics = asyncio.run(main())
    assert health.status_code == 503 and health.json() == {"error": "Model is loading", "error_type": "unavailable"}
    assert info.status_code == 503
    assert gen.status_code == 503 and gen.json()["error_type"] == "unavailable"
    assert metrics.status_code == 200


def test_a_bundle_that_fails_to_load_keeps_health_at_503_with_the_reason(tmp_path):
    from treespec.server.app import build_app

    called = []
    app = build_app(Settings(bundle=str(tmp_path / "missing")), on_load_failed=lambda: called.append(True))

    async def main():
        async with app.router.lifespan_context(app):
            scheduler = app.state.scheduler
            for _ in range(200):
                if scheduler.state != "loading":
                    break
                await asyncio.sleep(0.01)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                return await c.get("/health")

    r = asyncio.run(main())
    assert r.status_code == 503 and "bundle directory not found" in r.json()["error"]
    assert called == [True]  # `treespec serve` stops (exit 1) instead of serving nothing


def _served_bundle(tmp_path, fitted, ranks_path, tree: str) -> Path:
    """The session's fitted bundle as it is ("fitted"), without its draft/ ("missing"),
    with its draft/ beside other weights of the same shape ("other weights"), or with
    a byte of its tree changed ("tampered")."""
    import shutil

    from treespec.model import save_bundle

    from conftest import tiny_model

    src, _ = fitted
    if tree == "other weights":
        path = save_bundle(tmp_path / "bundle", tiny_model(seed=5), ranks_path)
        shutil.copytree(src / "draft", path / "draft")
        return path
    path = tmp_path / "bundle"
    shutil.copytree(src, path)
    if tree == "missing":
        shutil.rmtree(path / "draft")
    elif tree == "tampered":
        text = (path / "draft" / "tree.txt").read_text()
        (path / "draft" / "tree.txt").write_text(text.replace("leaf_value=", "leaf_value=1", 1))
    return path


@pytest.mark.parametrize("tree,setting,default,why", [
    ("fitted", "auto", "tree", None),  # auto: the bundle's tree when it has one
    ("missing", "auto", "ngram", "the tree drafter is not fitted for this bundle"),  # ... else ngram
    ("other weights", "auto", "ngram", "this drafter was fitted against model weights"),  # costs the tree only
    ("tampered", "auto", "ngram", "tree.txt: checksum does not match meta.json"),
    ("fitted", "none", "none", None),
])
def test_default_drafter(tmp_path, fitted, ranks_path, monkeypatch, tree, setting, default, why):
    """The real registry and the real drafter through Scheduler.load, and what /info says."""
    from treespec.draft import registry
    from treespec.server.serving import Serving
    from treespec.server.scheduler import Scheduler
    from treespec.server.metrics import Metrics

    real = registry.make_drafter
    asked = []

    def spy(name, bundle, calibrate=False):
        asked.append(calibrate)
        return real(name, bundle, calibrate=False)  # calibrating is timed elsewhere; keep this fast

    monkeypatch.setattr(registry, "make_drafter", spy)
    settings = Settings(bundle=str(_served_bundle(tmp_path, fitted, ranks_path, tree)), default_drafter=setting,
                        dtype="float32")
    scheduler = Scheduler(settings, Metrics())
    scheduler.load()
    try:
        assert scheduler.default_drafter == default
        assert asked and all(asked)  # the server calibrates its drafters by default (calibrate_drafter)
        info = Serving(scheduler, settings, scheduler.metrics).info()["drafters"]
        assert info["default"] == default
        if why is None:
            # The fit picks k_max (at most --k-max) from timed drafter costs, so it
            # can differ between machines: /info must show the one the fit wrote.
            chosen = json.loads((fitted[0] / "draft" / "meta.json").read_text())["settings"]["k_max"]
            assert "tree" in info["available"] and info["settings"]["tree"]["k_max"] == chosen
        else:
            assert "tree" not in info["available"] and why in info["unavailable"]["tree"], info["unavailable"]
    finally:
        scheduler.shutdown(0)


def test_default_drafter_tree_without_a_tree_fails_the_load(tiny_bundle):
    from treespec.server.scheduler import Scheduler
    from treespec.server.metrics import Metrics

    scheduler = Scheduler(Settings(bundle=str(tiny_bundle), default_drafter="tree"), Metrics())
    with pytest.raises(ValueError, match="default_drafter 'tree' is not available"):
        scheduler.load()
    assert scheduler.state == "failed" and "not available" in scheduler.load_error


def test_every_known_label_combination_is_exported_at_zero():
    """A dashboard panel on the failure counter shows 0 on a healthy server, not "no data"."""
    from prometheus_client.parser import text_string_to_metric_families

    from treespec.server.metrics import FAILURE_REASONS, FINISH_REASONS, Metrics

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(Metrics().exposition().decode()) for s in fam.samples}
    for drafter in ("none", "ngram", "tree"):
        for reason in FAILURE_REASONS:
            key = ("treespec_request_failure_total", (("drafter", drafter), ("reason", reason)))
            assert samples[key] == 0.0
        for reason in FINISH_REASONS:
            assert samples[("treespec_request_success_total", (("drafter", drafter), ("finish_reason", reason)))] == 0.0
        assert samples[("treespec_spec_decode_num_draft_tokens_total", (("drafter", drafter),))] == 0.0
        assert samples[("treespec_requests_waiting", (("drafter", drafter),))] == 0.0
    assert samples[("treespec_request_failure_total", (("drafter", "unknown"), ("reason", "validation")))] == 0.0
