"""``nearl``: local tools for one site (no federation involved).

    nearl demo-data  --out DIR --sites N          synthetic multi-site data (embedded default)
    nearl check-data --data SITE [--config X]     validate a site folder, print counts
                                                  (without --config, the classes come from the folders)
    nearl params     [--config X] [--json]        parameter breakdown and payload size
    nearl train      --data SITE --out DIR        centralized / local-only baseline
                     [--dp-epsilon E]             ... under sample-level DP (docs/privacy.md)
    nearl evaluate   --adapters DIR --data SITE   metrics of saved adapters on a split
    nearl predict    --adapters DIR IMAGE...      class + probabilities per image
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from nearl_core.errors import NearlError, NearlWarning
from nearl_core import flags, site_check, workflows


def _add_config(p: argparse.ArgumentParser) -> None:
    flags.add_config_flags(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nearl", description="NEARL adapters on CLIP: local tools for one site.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo-data", help="generate the synthetic multi-site demo data set")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-per-site", type=int, default=96)
    p.add_argument("--overwrite", action="store_true", help="replace existing site folders under --out")

    p = sub.add_parser("check-data", help="validate a site folder and print per-split, per-class counts")
    p.add_argument("--data", required=True, type=Path)
    _add_config(p)

    p = sub.add_parser("params", help="print total / trainable / per-component parameter counts")
    _add_config(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("train", help="train adapters on one site folder (centralized / local-only baseline)")
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    flags.add_device_flag(p)
    p.add_argument("--overwrite", action="store_true", help="replace adapters already in --out")
    flags.add_dp_flags(p, what="this site (the ledger is --out/privacy.json)")
    _add_config(p)

    p = sub.add_parser("evaluate", help="evaluate saved adapters on a site's split")
    p.add_argument("--adapters", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--split", default=None, help="test (default when present) or val")
    p.add_argument("--pretrained", default=None, help="backbone weights if they moved since training")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("predict", help="classify images with saved adapters")
    p.add_argument("--adapters", required=True, type=Path)
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--pretrained", default=None, help="backbone weights if they moved since training")
    p.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    logging.basicConfig(level=logging.ERROR)
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():  # restores the filters and showwarning when the command ends
        warnings.simplefilter("always", NearlWarning)
        warnings.showwarning = _one_line_warnings(args.command, warnings.showwarning)
        try:
            return _dispatch(args)
        except NearlError as err:
            print(f"nearl {args.command}: error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"nearl {args.command}: interrupted", file=sys.stderr)
            return 130


def _one_line_warnings(command: str, fallback: Callable[..., None]) -> Callable[..., None]:
    """Print a :class:`NearlWarning` like an error line (no file and line number); others as usual."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, NearlWarning):
            print(f"nearl {command}: warning: {message}", file=sys.stderr)
        else:
            fallback(message, category, filename, lineno, file, line)
    return show


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "demo-data":
        workflows.demo_data(args.out, args.sites, seed=args.seed, train_per_site=args.train_per_site,
                            overwrite=args.overwrite)
    elif args.command == "check-data":
        site_check.check_data(args.data, workflows.config_from_args(args))
    elif args.command == "params":
        report = workflows.params(workflows.config_from_args(args, reads_site=False))
        print(json.dumps(report, indent=2) if args.json else workflows.format_params(report))
    elif args.command == "train":
        workflows.train(args.data, args.out, workflows.config_from_args(args), overwrite=args.overwrite)
    elif args.command == "evaluate":
        metrics = workflows.evaluate_folder(args.adapters, args.data, split=args.split, pretrained=args.pretrained)
        print(json.dumps(metrics, indent=2) if args.json else workflows.format_metrics({"NEARL": metrics}))
    elif args.command == "predict":
        rows = workflows.predict(args.adapters, args.images, pretrained=args.pretrained)
        print(json.dumps(rows, indent=2) if args.json else workflows.format_predictions(rows))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
