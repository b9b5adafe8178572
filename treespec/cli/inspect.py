"""``treespec inspect BUNDLE``: verify a bundle and print what is in it."""

from __future__ import annotations

import json


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="verify a model bundle and print its config")
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..model.bundle import load_bundle

    b = load_bundle(args.bundle)
    info = {
        "path": str(b.path),
        "config": b.config.to_dict(),
        "parameters": b.model.num_params(non_embedding=False),
        "weights_sha256": b.weights_sha256,
        "has_drafter": (b.draft_dir / "meta.json").is_file(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        c = b.config
        print(f"{b.path}: {info['parameters'] / 1e6:.1f}M parameters, {c.n_layer} layers x {c.n_embd}, "
              f"{c.n_head} heads, context {c.block_size}")
        print(f"  exits after blocks {list(c.exit_layers)} (loss weights {list(c.exit_loss_weights)})")
        print(f"  DWA: {'on (dilation %d, period %d)' % (c.dwa_dilation, c.dwa_period) if c.dwa else 'off'}")
        skips = [name for name, on in (("embedding", c.embed_skip), ("U-Net", c.unet_skip)) if on]
        print(f"  skip connections: {', '.join(skips) if skips else 'none'}")
        print(f"  drafter: {'yes' if info['has_drafter'] else 'none'}; weights sha256 {b.weights_sha256[:16]}…")
    return 0
