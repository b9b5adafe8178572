"""The tree drafter on disk: what ``draft-fit`` writes and ``TreeDrafter.load`` reads.

``BUNDLE/draft/`` holds ``tree.txt`` (LightGBM's text format, never a
pickle), ``bigram.safetensors`` (``draft.corpus``) and ``meta.json``::

    format, format_version   what the file is (refused unless this treespec's)
    feature_version          the features it was fitted on (draft.features)
    weights_sha256           the model weights it was fitted against
    model_file, model_sha256 the LightGBM file and its checksum
    classes                  the class map, with each token's text, for people
    features                 the FeatureSpec: classes, PCA matrix, sizes
    settings                 how it drafts and what that costs (TreeSettings)
    fit                      what fitting did and measured: a report

``read`` checks all of it and returns a ``DrafterMeta``; ``DrafterMeta.write``
writes the same layout back. Keys this treespec does not know (at the top
level or in settings) are kept and written back, so a rewrite such as
``draft-fit --corpus-bigram only`` never drops what a newer fit recorded.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..model.tokenizer import sha256_file
from .copylen import CopyLengths
from .features import FEATURE_VERSION, FeatureSpec

META_FILE = "meta.json"
MODEL_FILE = "tree.txt"
FORMAT = "treespec-tree-drafter"
FORMAT_VERSION = 1
RULES = ("myopic", "lookahead")


class DrafterError(ValueError):
    """A drafter that cannot be loaded; the message says which file and why."""


@dataclass
class CorpusEntry:
    """The corpus bigram's file in the drafter's folder, and what it was counted from."""

    file: str
    sha256: str | None = None
    min_count: int | None = None
    tokens: int | None = None  # token ids it has a follower for
    corpus_tokens: int | None = None  # length of the training split it was counted on

    @classmethod
    def from_dict(cls, m: dict) -> CorpusEntry:
        return cls(file=str(m["file"]), sha256=m.get("sha256"), min_count=m.get("min_count"),
                   tokens=m.get("tokens"), corpus_tokens=m.get("corpus_tokens"))


@dataclass(kw_only=True)
class TreeSettings:
    """How the drafter drafts (chosen by draft-fit's simulation) and the costs it weighs.

    Only k_max, p_min, verify_ms and predict_ms are required: the rest
    default to the drafter without the setting (a file fitted before it
    existed drafts as it did then)."""

    k_max: int  # longest draft
    p_min: float  # lowest probability a drafted token may have
    threshold: float | None = None  # model probability a token needed to be a token label
    verify_ms: list[float]  # verify forward over T = 1, 2, ... positions
    predict_ms: float  # one draft depth: n-gram lookup, features, tree
    state_ms: float | None = None  # the model features, once per proposal
    rule: str = "myopic"  # tree.worth_drafting: "myopic" or "lookahead"
    copy_through: bool = False
    trust_match: int = 0  # the trusted-match shortcut's shortest match (0: off)
    copy_k: int = 0  # how far it copies without a table
    copy_lengths: CopyLengths | None = None  # how far it copies with one (draft.copylen)
    copy_ms: float | None = None  # one prompt-lookup copy
    proposal_ms: float | None = None  # a proposal inside the decode loop; measured only with the verify curve
    corpus_bigram: CorpusEntry | None = None
    extra: dict = field(default_factory=dict)  # keys this treespec does not know

    @property
    def lookahead(self) -> bool:
        return self.rule == "lookahead"

    @classmethod
    def from_dict(cls, m: dict, where: Path) -> TreeSettings:
        """The settings in ``m``; DrafterError (naming ``where``) where they are malformed."""
        known = {f.name for f in fields(cls)} - {"extra"}
        try:
            s = cls(k_max=int(m["k_max"]), p_min=float(m["p_min"]), threshold=_opt(float, m.get("threshold")),
                    verify_ms=[float(v) for v in m["verify_ms"]], predict_ms=float(m["predict_ms"]),
                    state_ms=_opt(float, m.get("state_ms")), rule=str(m.get("rule", "myopic")),
                    copy_through=bool(m.get("copy_through", False)), trust_match=int(m.get("trust_match", 0)),
                    copy_k=int(m.get("copy_k", 0)), copy_ms=_opt(float, m.get("copy_ms")),
                    proposal_ms=_opt(float, m.get("proposal_ms")),
                    extra={k: v for k, v in m.items() if k not in known})
        except KeyError as e:
            raise DrafterError(f"{where}: settings lack {e}") from None
        except (TypeError, ValueError) as e:
            raise DrafterError(f"{where}: bad settings ({e})") from None
        if s.rule not in RULES:
            raise DrafterError(f"{where}: unknown stopping rule {s.rule!r} in settings (one of {', '.join(RULES)})")
        if m.get("corpus_bigram"):
            try:
                s.corpus_bigram = CorpusEntry.from_dict(m["corpus_bigram"])
            except (KeyError, TypeError, ValueError) as e:
                raise DrafterError(f"{where}: bad corpus bigram ({e})") from None
        if m.get("copy_lengths"):
            try:
                s.copy_lengths = CopyLengths.from_meta(m["copy_lengths"])
            except (KeyError, TypeError, ValueError) as e:
                raise DrafterError(f"{where}: bad copy-length table ({e})") from None
        return s

    def to_dict(self) -> dict:
        m = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        m["copy_lengths"] = None if self.copy_lengths is None else self.copy_lengths.to_meta()
        m["corpus_bigram"] = None if self.corpus_bigram is None else asdict(self.corpus_bigram)
        if self.proposal_ms is None:  # only a fit that timed the verify itself measures it
            del m["proposal_ms"]
        return {**m, **self.extra}


@dataclass(kw_only=True)
class DrafterMeta:
    """``meta.json``, read and checked. Its format and versions are this
    treespec's (``read`` refuses any other), so they are not fields."""

    weights_sha256: str
    model_file: str = MODEL_FILE
    model_sha256: str | None = None
    classes: dict = field(default_factory=dict)  # tokens, copy, model, text: for people reading the file
    features: FeatureSpec
    settings: TreeSettings
    fit: dict = field(default_factory=dict)  # what fitting did and measured (inputs, timings, simulation)
    extra: dict = field(default_factory=dict)  # keys this treespec does not know

    @property
    def context_len(self) -> int:
        """The context length fitting timed the costs at."""
        return (self.fit.get("min_context", 32) + self.fit.get("max_context", 384)) // 2

    def to_dict(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "feature_version": FEATURE_VERSION,
                "weights_sha256": self.weights_sha256, "model_file": self.model_file,
                "model_sha256": self.model_sha256, "classes": self.classes, "features": self.features.to_meta(),
                "settings": self.settings.to_dict(), "fit": self.fit, **self.extra}

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")


def read(path: str | Path, bundle=None) -> DrafterMeta:
    """The drafter's ``meta.json`` at ``path``, checked: its format, feature
    version, model file and checksum, feature spec and settings, and with
    ``bundle`` that it was fitted against this bundle's weights and shape.
    DrafterError says which file is wrong and why."""
    path = Path(path)
    refit = f"`treespec draft-fit --bundle {bundle.path if bundle is not None else 'BUNDLE'}`"
    if not path.is_file():
        raise DrafterError(f"{path}: no fitted tree drafter in this bundle; run {refit}")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DrafterError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("format_version") != FORMAT_VERSION:
        got = m if isinstance(m, dict) else {}
        raise DrafterError(f"{path}: not a treespec tree drafter of format version {FORMAT_VERSION} "
                           f"(format {got.get('format')!r}, version {got.get('format_version')!r})")
    fv = m.get("feature_version")
    if fv != FEATURE_VERSION:
        raise DrafterError(f"{path}: fitted with feature version {fv!r}, but this treespec computes "
                           f"feature version {FEATURE_VERSION}; refit it with {refit}")
    if bundle is not None and m.get("weights_sha256") != bundle.weights_sha256:
        raise DrafterError(f"{path}: this drafter was fitted against model weights with sha256 "
                           f"{m.get('weights_sha256')}, but the bundle's weights have sha256 "
                           f"{bundle.weights_sha256}; its features would not mean what it learned. "
                           f"Refit it with {refit}")
    model_path = path.parent / m.get("model_file", MODEL_FILE)
    if not model_path.is_file():
        raise DrafterError(f"{model_path}: missing LightGBM model file")
    if m.get("model_sha256") and sha256_file(model_path) != m["model_sha256"]:
        raise DrafterError(f"{model_path}: checksum does not match meta.json; the file was changed "
                           f"after fitting")
    try:
        spec = FeatureSpec.from_meta(m["features"])
    except (KeyError, TypeError, ValueError) as e:
        raise DrafterError(f"{path}: bad feature spec ({e})") from None
    if bundle is not None:
        cfg = bundle.config
        if spec.pca_mean.shape[0] != cfg.n_embd or spec.n_exits != len(cfg.exit_layers) - 1:
            raise DrafterError(f"{path}: feature spec is for a model with n_embd "
                               f"{spec.pca_mean.shape[0]} and {spec.n_exits} intermediate exits, "
                               f"not this bundle's {cfg.n_embd} and {len(cfg.exit_layers) - 1}")
    if not isinstance(m.get("settings"), dict):
        raise DrafterError(f"{path}: no settings")
    top = ({"format", "format_version", "feature_version"} | {f.name for f in fields(DrafterMeta)}) - {"extra"}
    return DrafterMeta(weights_sha256=m.get("weights_sha256"), model_file=m.get("model_file", MODEL_FILE),
                       model_sha256=m.get("model_sha256"), classes=m.get("classes", {}), features=spec,
                       settings=TreeSettings.from_dict(m["settings"], path), fit=m.get("fit", {}),
                       extra={k: v for k, v in m.items() if k not in top})


def _opt(kind, x):
    return None if x is None else kind(x)
