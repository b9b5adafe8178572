"""Server pieces that need no running server: settings from TREESPEC_*,
request semantics, and /health's 503 before the bundle has loaded."""

from __future__ import annotations

import asyncio

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
            engine = app.state.engine
            for _ in range(200):
                if engine.state != "loading":
                    break
                await asyncio.sleep(0.01)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                return await c.get("/health")

    r = asyncio.run(main())
    assert r.status_code == 503 and "bundle directory not found" in r.json()["error"]
    assert called == [True]  # `treespec serve` stops (exit 1) instead of serving nothing


class _FakeTree:
    """Stands in for a fitted tree drafter: the registry is what is under test here."""

    name, k_max = "tree", 3

    def propose(self, context, features, k_max):
        from treespec.draft.types import Draft

        return Draft(tokens=[])


@pytest.mark.parametrize("tree,setting,default", [
    ("fitted", "auto", "tree"),  # auto: the bundle's tree when it has one
    ("missing", "auto", "ngram"),  # ... else ngram
    ("broken", "auto", "ngram"),  # a broken tree costs the tree only
    ("fitted", "none", "none"),
])
def test_default_drafter(tiny_bundle, monkeypatch, tree, setting, default):
    from treespec.draft import registry
    from treespec.server.engine import Engine
    from treespec.server.metrics import Metrics

    real = registry.make_drafter
    asked = []

    def make(name, bundle, calibrate=False):
        asked.append(calibrate)
        if name != "tree":
            return real(name, bundle)
        if tree == "fitted":
            return _FakeTree()
        if tree == "broken":
            raise ValueError("meta.json: fitted against other weights")
        raise registry.DrafterUnavailable("no draft/meta.json")

    monkeypatch.setattr(registry, "make_drafter", make)
    engine = Engine(Settings(bundle=str(tiny_bundle), default_drafter=setting), Metrics())
    engine.load()
    try:
        assert engine.default_drafter == default
        assert asked and all(asked)  # the server calibrates its drafters by default (calibrate_drafter)
        assert ("tree" in engine.drafters) == (tree == "fitted")
        if tree != "fitted":
            assert "tree" in engine.unavailable
    finally:
        engine.shutdown(0)


def test_default_drafter_tree_without_a_tree_fails_the_load(tiny_bundle):
    from treespec.server.engine import Engine
    from treespec.server.metrics import Metrics

    engine = Engine(Settings(bundle=str(tiny_bundle), default_drafter="tree"), Metrics())
    with pytest.raises(ValueError, match="default_drafter 'tree' is not available"):
        engine.load()
    assert engine.state == "failed" and "not available" in engine.load_error
