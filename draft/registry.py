"""Drafters by name, for the CLI, the benchmark and the server."""

from __future__ import annotations

from .ngram import NgramDrafter
from .types import Drafter

DRAFTERS = ("none", "ngram", "tree")


class DrafterUnavailable(ValueError):
    """The requested drafter cannot be built for this bundle."""


def make_drafter(name: str, bundle=None) -> Drafter | None:
    """The drafter called ``name`` for ``bundle``; None means vanilla decoding."""
    if name == "none":
        return None
    if name == "ngram":
        return NgramDrafter()
    if name == "tree":
        if bundle is None:
            raise DrafterUnavailable("the tree drafter needs a bundle to load it from")
        meta = bundle.draft_dir / "meta.json"
        if not meta.is_file():
            raise DrafterUnavailable(
                f"the tree drafter is not fitted for this bundle: {meta} is missing; "
                f"run `treespec draft-fit --bundle {bundle.path}` first, or use --drafter ngram")
        from .tree import TreeDrafter  # lazy: LightGBM loads only when a tree is asked for

        return TreeDrafter.load(bundle)
    raise DrafterUnavailable(f"unknown drafter {name!r}; choose one of {', '.join(DRAFTERS)}")
