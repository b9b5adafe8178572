"""treespec: a small-model speculative inference server with a LightGBM drafter."""

__version__ = "0.1.0"
