"""``treespec import`` and ``treespec export``: checkpoints in, HF and GGUF out (docs/interop.md)."""

from __future__ import annotations

import sys

_DTYPES = ("float32", "float16", "bfloat16")


def add_parser(sub, name: str) -> None:
    if name == "import":
        p = sub.add_parser(name, help="import a Hugging Face GPT-2, nanoGPT or treespec training checkpoint as a bundle",
                           description="Turn a Hugging Face GPT-2 directory or a nanoGPT ckpt.pt into a "
                                       "single-exit treespec bundle, or a treespec run's checkpoint into "
                                       "a bundle of the model as of that step (see docs/interop.md).")
        p.add_argument("source", help="a Hugging Face model directory (--from hf), a nanoGPT ckpt.pt (--from nanogpt), "
                                      "or a treespec run folder or its ckpt.pt (--from checkpoint)")
        p.add_argument("--from", dest="fmt", required=True, choices=["hf", "nanogpt", "checkpoint"],
                       help="the source format")
        p.add_argument("--out", required=True, help="the bundle directory to write")
        p.add_argument("--dtype", choices=_DTYPES, default=None,
                       help="storage precision of the bundle's weights (default: the source's; "
                            "for a checkpoint, the run's save_dtype)")
        p.add_argument("--tokenizer", default=None,
                       help="r50k_base ranks file to check against and copy (default: found as for tests)")
        p.add_argument("--force", action="store_true", help="replace --out if it exists")
        p.set_defaults(func=run_import)
    else:
        p = sub.add_parser(name, help="export a bundle to Hugging Face or GGUF (llama.cpp)",
                           description="Export a bundle's final exit as a Hugging Face GPT2LMHeadModel "
                                       "directory or a GGUF file for llama.cpp (see docs/interop.md).")
        p.add_argument("bundle", help="bundle directory")
        p.add_argument("--to", dest="fmt", required=True, choices=["hf", "gguf"], help="the target format")
        p.add_argument("out", help="output directory (hf) or file (gguf)")
        p.add_argument("--type", dest="qtype", default="f16", choices=["f32", "f16", "q8_0"],
                       help="GGUF weight type (default f16)")
        p.add_argument("--force", action="store_true", help="replace the output if it exists")
        p.set_defaults(func=run_export)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


def run_import(args) -> int:
    import torch

    from ..model.bundle import BundleError
    from ..model.interop import InteropError, import_hf, import_nanogpt
    from ..model.tokenizer import TokenizerNotFound

    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        if args.fmt == "checkpoint":
            from ..training.train import bundle_from_checkpoint
            out = bundle_from_checkpoint(args.source, args.out, force=args.force, dtype=dtype,
                                         tokenizer=args.tokenizer)
        else:
            fn = import_hf if args.fmt == "hf" else import_nanogpt
            out = fn(args.source, args.out, force=args.force, dtype=dtype, tokenizer=args.tokenizer, log=_log)
    except (InteropError, BundleError, TokenizerNotFound) as e:
        print(f"treespec import: {e}", file=sys.stderr)
        return 2
    from ..model.bundle import load_bundle
    b = load_bundle(out)
    c = b.config
    step = b.meta.get("imported_from", {}).get("step")
    print(f"wrote {out}: {b.model.num_params(non_embedding=False) / 1e6:.1f}M parameters, "
          f"{c.n_layer} layers x {c.n_embd}, {c.n_head} heads, context {c.block_size}, "
          f"activation {c.activation}, exits {list(c.exit_layers)}"
          + (f", as of training step {step}" if step is not None else ""))
    return 0


def run_export(args) -> int:
    from ..model.bundle import BundleError
    from ..model.interop import InteropError, export_hf

    try:
        if args.fmt == "hf":
            out = export_hf(args.bundle, args.out, force=args.force, log=_log)
        else:
            from ..model.gguf_export import export_gguf
            out = export_gguf(args.bundle, args.out, args.qtype, force=args.force, log=_log)
    except (InteropError, BundleError) as e:
        print(f"treespec export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
