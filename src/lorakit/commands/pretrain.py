"""`lorakit pretrain`: pre-train the small embedded base model from scratch (lab/pretrain.py)."""
from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from lorakit.lab.config import PretrainConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lorakit pretrain`: --out plus one flag per PretrainConfig field."""
    parser.add_argument("--out", required=True, help="folder to write model/, data/, run/, recipe.json")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch; the recipe used 1, which is also far faster on a "
                             "busy machine (0: torch's default)")
    for f in fields(PretrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = {"int": int, "float": float, "str": str}.get(str(f.type).split(" ")[0], int)
        parser.add_argument(flag, dest=f.name, type=kind, default=f.default,
                            help=f"{f.metadata['help']} (default: {f.default})")


def run(args: argparse.Namespace) -> int:
    """Run the pre-training and print where the result went."""
    import torch

    from lorakit.lab.pretrain import pretrain

    cfg = PretrainConfig(**{f.name: getattr(args, f.name) for f in fields(PretrainConfig)})
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = pretrain(cfg, Path(args.out))
    measured = recipe["measured"]
    print(f"pre-trained {recipe['parameters']:,} parameters in "
          f"{recipe['training']['wall_time_s']:.0f} s ({recipe['training']['tokens_per_s']:,.0f} tok/s)")
    print(f"declarative recall {measured['declarative_recall']:.1%}, "
          f"held-out question answering {measured['heldout_qa_exact_match']:.1%} (base model)")
    print(f"wrote {args.out}/model, data/, run/ and recipe.json")
    return 0
