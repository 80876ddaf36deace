"""Bench a: trainable parameters and bytes per site per round, NEARL vs full fine-tuning.

    python bench/payload.py [--config vit-b16]

Per round a site downloads the global weights and uploads its update: 2 x payload.
Full fine-tuning of the same CLIP would move every weight both ways.
"""

from __future__ import annotations

import argparse

from common import header, result
from nearl_core.config import load_config
from nearl_core.workflows import params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="vit-b16")
    args = parser.parse_args()
    header("payload: NEARL adapters vs full fine-tuning (bytes per site per round, fp32)")
    report = params(load_config(args.config))  # random init: counts and sizes do not depend on weights
    nearl_bytes = 2 * report["payload_bytes"]
    full_bytes = 2 * report["full_model_bytes"]
    print(f"{'':<28}{'NEARL':>16}{'full fine-tuning':>20}")
    print(f"{'trainable parameters':<28}{report['trainable']:>16,}{report['total']:>20,}")
    print(f"{'bytes per site per round':<28}{nearl_bytes:>16,}{full_bytes:>20,}")
    result("trainable_params", report["trainable"], report["total"], 1 / 90, unit="params")
    result("payload_bytes_per_round", nearl_bytes, full_bytes, 1 / 90, unit="B")


if __name__ == "__main__":
    main()
