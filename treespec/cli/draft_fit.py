"""``treespec draft-fit``: the command around ``treespec.draft.fit`` (what it
does, step by step, is that module's docstring)."""

from __future__ import annotations

import sys

from ..draft import fit
from ..model.kernels import DTYPE_CHOICES


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="fit the tree drafter to a bundle's model",
                       description=fit.__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, help="bundle directory (the drafter goes to BUNDLE/draft/)")
    p.add_argument("--data-dir", default="data/default", help="prepared corpus (default: %(default)s)")
    p.add_argument("--contexts", type=int, default=600, help="training windows (default: %(default)s)")
    p.add_argument("--steps-per-context", type=int, default=32,
                   help="greedy steps whose states become rows, per window (default: %(default)s)")
    p.add_argument("--classes", type=int, default=64,
                   help="K, the token classes; each costs one tree per boosting round at every draft depth "
                        "(default: %(default)s)")
    p.add_argument("--pca-dims", type=int, default=24, help="PCA dimensions of the hidden state (default: %(default)s)")
    p.add_argument("--k-max", type=int, default=8,
                   help="longest draft considered; the held-out simulation keeps the fastest length up to it "
                        "(default: %(default)s)")
    p.add_argument("--p-min", type=float, default=None,
                   help="lowest probability a drafted token may have (default: tuned on held-out contexts)")
    p.add_argument("--copy-through", choices=("auto", "yes", "no"), default="auto",
                   help="where the tree says __MODEL__, still draft the n-gram candidate when it pays for its "
                        "verify position; 'auto' keeps it only if the held-out simulation is faster with it "
                        "(default: %(default)s)")
    p.add_argument("--trust-match", default="auto", choices=("auto", "off", "1", "2", "3"),
                   help="where the n-gram match at depth 0 is at least this many tokens long, skip the tree and "
                        "copy the continuation (its length is fitted too: a fixed one, or the copy-length table "
                        "of draft/copylen.py); 'auto' keeps the fastest in the "
                        "held-out simulation, 'off' asks the tree every step (default: %(default)s)")
    p.add_argument("--corpus-bigram", choices=("yes", "no", "only"), default="yes",
                   help="count the training split's bigram, for one-token guesses where the context has nothing "
                        "to copy; 'only' recounts it for an already fitted drafter and changes nothing else "
                        "(default: %(default)s)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="model probability a token needs to be a token label (default: %(default)s)")
    p.add_argument("--balance-domains", action="store_true",
                   help="draw the same number of windows from every domain of the corpus (e.g. code and prose) "
                        "instead of in proportion to their size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="contexts run together (default: %(default)s)")
    p.add_argument("--min-context", type=int, default=32)
    p.add_argument("--max-context", type=int, default=384)
    p.add_argument("--rounds", type=int, default=300, help="most boosting rounds (default: %(default)s)")
    p.add_argument("--learning-rate", type=float, default=0.2)
    p.add_argument("--num-leaves", type=int, default=15)
    p.add_argument("--max-depth", type=int, default=5, help="tree depth cap: bounds the predict cost")
    p.add_argument("--verify-ms", default="auto",
                   help="verify forward cost in ms for T=1,2,... positions, comma-separated, or 'auto' to "
                        "measure it here (default: %(default)s)")
    p.add_argument("--verify-threads", type=int, default=None,
                   help="torch threads to time the verify forward on: the count you will serve with "
                        f"(default: torch's default here, {fit.SERVING_THREADS})")
    p.add_argument("--verify-dtype", choices=DTYPE_CHOICES, default="auto",
                   help="the precision you will serve with (treespec serve --dtype): the drafter's costs are "
                        "timed on its kernels (default: %(default)s, as serve's)")
    p.add_argument("--threads", type=int, default=1,
                   help="threads for LightGBM and torch (default: %(default)s; OpenMP threads on a machine whose "
                        "cores are busy spin instead of working, which made a 2-thread fit 100x slower here)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..model import BundleError
    from ..training.data import DataError

    try:
        verify = "auto" if args.verify_ms == "auto" else [float(x) for x in args.verify_ms.split(",") if x.strip()]
    except ValueError:
        print(f"treespec draft-fit: error: --verify-ms must be 'auto' or numbers, got {args.verify_ms!r}",
              file=sys.stderr)
        return 2
    try:
        if args.corpus_bigram == "only":
            fit.refit_corpus_bigram(args.bundle, args.data_dir)
            return 0
        fit.fit_drafter(args.bundle, args.data_dir, contexts=args.contexts, steps=args.steps_per_context,
                    n_classes=args.classes, pca_dims=args.pca_dims, k_max=args.k_max, p_min=args.p_min,
                    threshold=args.threshold, seed=args.seed, batch_size=args.batch_size,
                    min_context=args.min_context, max_context=args.max_context, rounds=args.rounds,
                    learning_rate=args.learning_rate, num_leaves=args.num_leaves, max_depth=args.max_depth,
                    verify_ms=verify, verify_threads=args.verify_threads, verify_dtype=args.verify_dtype,
                    copy_through={"auto": None, "yes": True, "no": False}[args.copy_through],
                    trust_match=None if args.trust_match == "auto" else 0 if args.trust_match == "off"
                    else int(args.trust_match), balance_domains=args.balance_domains,
                    corpus_bigram=args.corpus_bigram == "yes",
                    threads=args.threads, progress=not args.no_progress)
    except (BundleError, DataError, ValueError) as e:
        print(f"treespec draft-fit: error: {e}", file=sys.stderr)
        return 2
    return 0
