"""Server settings: one dataclass, filled from defaults, then ``TREESPEC_*``
environment variables, then command-line flags (the later wins).

Every field ``name`` is read from ``TREESPEC_<NAME>`` (upper case), e.g.
``TREESPEC_BUNDLE``, ``TREESPEC_PORT``, ``TREESPEC_API_KEY``,
``TREESPEC_MAX_RUNNING``. Plain code rather than pydantic-settings: the
parsing needed is four types, and it keeps the dependency list short.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

ENV_PREFIX = "TREESPEC_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class SettingsError(ValueError):
    pass


@dataclass
class Settings:
    bundle: str = "models/default"
    host: str = "127.0.0.1"
    port: int = 8000
    # Bearer token for the generate routes; None leaves them open.
    api_key: str | None = None
    # Requests that hold a KV cache and take turns on the model (one verify
    # step each, round robin), and requests admitted to wait for a turn.
    # Beyond both, a request gets 429 at once.
    max_running: int = 4
    max_waiting: int = 16
    # Run the running requests' forwards as one batch (GPT.forward_batch): on
    # a memory-bound CPU, four one-token rows cost about what one does. Off:
    # one forward at a time, so each output is bit for bit a solo run's.
    batching: bool = True
    # Request bodies above this many bytes get 413 before they are parsed.
    max_body_bytes: int = 1 << 20
    # max_new_tokens when a request leaves it out (TGI / OpenAI routes alike).
    default_max_new_tokens: int = 64
    # "auto": the bundle's tree drafter if it has one, else "ngram".
    default_drafter: str = "auto"
    # Time the tree drafter's verify cost on this machine at startup (about
    # 2 s) instead of trusting the costs fitted on the machine draft-fit ran on.
    calibrate_drafter: bool = True
    # Comma-separated origins allowed by CORS; empty turns CORS off.
    cors_origins: list[str] = field(default_factory=list)
    # Name reported as the OpenAI "model" and TGI "model_id"; default: the bundle directory name.
    model_name: str | None = None
    device: str = "cpu"
    # Weight precision of the matrix products: auto (the fastest timed at startup
    # among float32, bfloat16, int8 and w8a8 whose loss on a quality check stays
    # within bounds of float32's), float32, bfloat16, int8 or w8a8 (docs/performance.md).
    dtype: str = "auto"
    # torch intra-op threads for the model; 0 keeps torch's default.
    threads: int = 0
    # Seconds that shutdown waits for in-flight requests before cancelling them.
    graceful_timeout_s: float = 30.0
    log_level: str = "info"
    # Test-only fault injection, off by default: when on, a prompt that starts
    # with "[[fail]]" raises inside the engine after its first verify step, and
    # one that starts with "[[slow]]" sleeps 50 ms per verify step.
    debug_faults: bool = False

    def validate(self) -> "Settings":
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise SettingsError(msg)

        need(1 <= self.port <= 65535 or self.port == 0, f"port must be in 0..65535, got {self.port}")
        need(self.max_running >= 1, f"max_running must be >= 1, got {self.max_running}")
        need(self.max_waiting >= 0, f"max_waiting must be >= 0, got {self.max_waiting}")
        need(self.max_body_bytes >= 1024, f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        need(self.default_max_new_tokens >= 1,
             f"default_max_new_tokens must be >= 1, got {self.default_max_new_tokens}")
        need(self.graceful_timeout_s >= 0, f"graceful_timeout_s must be >= 0, got {self.graceful_timeout_s}")
        need(self.dtype in ("auto", "float32", "bfloat16", "int8", "w8a8"),
             f"dtype must be auto, float32, bfloat16, int8 or w8a8, got {self.dtype!r}")
        need(self.api_key is None or len(self.api_key) > 0, "api_key must not be empty")
        return self


def _parse(name: str, kind: Any, raw: str) -> Any:
    """Parse one environment string to the field's type."""
    kind = str(kind)
    try:
        if kind.startswith("bool"):
            low = raw.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError(f"expected one of {sorted(_TRUE | _FALSE)}")
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
        if kind.startswith("list"):
            return [s.strip() for s in raw.split(",") if s.strip()]
        if "None" in kind:  # str | None: an empty value means unset
            return raw or None
        return raw
    except ValueError as e:
        raise SettingsError(f"{ENV_PREFIX}{name.upper()}={raw!r}: {e}") from None


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    environ = os.environ if environ is None else environ
    out = {}
    for f in fields(Settings):
        key = ENV_PREFIX + f.name.upper()
        if key in environ:
            out[f.name] = _parse(f.name, f.type, environ[key])
    return out


def load_settings(cli: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Defaults < environment < ``cli`` (entries that are None count as not given)."""
    values = env_overrides(environ)
    names = {f.name for f in fields(Settings)}
    for k, v in (cli or {}).items():
        if k in names and v is not None:
            values[k] = v
    return Settings(**values).validate()
