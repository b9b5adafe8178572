"""Drafters by name, for the CLI, the benchmark and the server.

A new drafter is a module with a class that follows ``types.Drafter`` (it
opens a per-request state, proposes, observes, and describes itself) and
one entry in ``FACTORIES``: the CLI's choices, the server, its metrics'
labels and the benchmark all read the names from there."""

from __future__ import annotations

from typing import Callable

from .gate import GatedDrafter
from .ngram import NgramDrafter
from .types import Drafter


class DrafterUnavailable(ValueError):
    """The requested drafter cannot be built for this bundle."""


def _tree(bundle, calibrate: bool) -> Drafter:
    if bundle is None:
        raise DrafterUnavailable("the tree drafter needs a bundle to load it from")
    meta = bundle.draft_dir / "meta.json"
    if not meta.is_file():
        raise DrafterUnavailable(
            f"the tree drafter is not fitted for this bundle: {meta} is missing; "
            f"run `treespec draft-fit --bundle {bundle.path}` first, or use --drafter ngram")
    from .tree import TreeDrafter  # lazy: LightGBM loads only when a tree is asked for

    tree = TreeDrafter.load(bundle)
    if calibrate:
        tree.calibrate()
    # Behind the gate, with its own __COPY__ path (prompt lookup) drafting while the tree does not pay.
    return GatedDrafter(tree, tree.fallback)


# name -> factory(bundle, calibrate); None is vanilla decoding.
FACTORIES: dict[str, Callable[..., Drafter | None]] = {
    "none": lambda bundle, calibrate: None,
    "ngram": lambda bundle, calibrate: NgramDrafter(),
    "tree": _tree,
}
DRAFTERS = tuple(FACTORIES)


def auto_drafter(available) -> str:
    """The one default rule, for `treespec generate` and `treespec serve` alike:
    the bundle's tree drafter when it has one that loads, else prompt lookup."""
    return "tree" if "tree" in available else "ngram"


def make_drafter(name: str, bundle=None, calibrate: bool = False) -> Drafter | None:
    """The drafter called ``name`` for ``bundle``; None means vanilla decoding.

    ``calibrate`` re-times a costed drafter's verify curve and own costs on
    this machine at the current torch thread count (``TreeDrafter.calibrate``),
    so set the threads first. Where it serves, it should: the fitted costs
    describe the machine it was fitted on."""
    factory = FACTORIES.get(name)
    if factory is None:
        raise DrafterUnavailable(f"unknown drafter {name!r}; choose one of {', '.join(DRAFTERS)}")
    return factory(bundle, calibrate)
