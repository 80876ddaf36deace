"""Bench b: a NEARL train step vs the frozen forward (floor) and a full fine-tuning step.

    python bench/train_step.py [--model ViT-B-16] [--batch 8] [--repeats 3]

Each arm runs in its own fresh process so that its peak memory is its own. The NEARL
process also times the frozen CLIP's no-grad forward on the same batch: the ratio
step / frozen-forward is measured side by side in one process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from common import header, median_time, peak_rss_mib, result, run_child
from nearl_core.config import from_dict
from nearl_core.model import build_model
from nearl_core.train import make_optimizer

CLASSES = ("normal", "pneumonia")


def _model(args):
    cfg = from_dict({"model": {"name": args.model}, "adapter": {"text-conditioning": args.mode},
                     "task": {"classes": list(CLASSES)}})
    torch.manual_seed(0)
    return build_model(cfg), cfg


def _batch(model, batch: int):
    size = model.clip.visual.image_size
    return torch.randn(batch, 3, *size), torch.randint(0, len(CLASSES), (batch,))


def child_nearl(args) -> dict:
    model, cfg = _model(args)
    x, y = _batch(model, args.batch)
    opt = make_optimizer(model, cfg.train)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x).logits, y).backward()
        opt.step()

    @torch.no_grad()
    def frozen_forward():
        model.zero_shot_logits(x)

    t_step = median_time(step, repeats=args.repeats)
    t_frozen = median_time(frozen_forward, repeats=args.repeats)
    return {"step_s": t_step, "frozen_forward_s": t_frozen, "peak_mib": peak_rss_mib()}


def child_full(args) -> dict:
    model, _ = _model(args)
    clip = model.clip
    for p in clip.parameters():
        p.requires_grad_(True)
    clip.train()
    x, y = _batch(model, args.batch)
    opt = torch.optim.AdamW(clip.parameters(), lr=1e-5)

    def step():
        opt.zero_grad(set_to_none=True)
        img = clip.encode_image(x, normalize=True)
        txt = clip.encode_text(model.full_tokens, normalize=True)
        F.cross_entropy(clip.logit_scale.exp() * img @ txt.t(), y).backward()
        opt.step()

    return {"step_s": median_time(step, repeats=args.repeats), "peak_mib": peak_rss_mib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--mode", default="per-image", choices=["per-image", "shared"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=["nearl", "full"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps((child_nearl if args.child == "nearl" else child_full)(args)))
        return
    header(f"train step: {args.model}, batch {args.batch}, {len(CLASSES)} classes, text {args.mode}")
    common = ["--model", args.model, "--mode", args.mode, "--batch", str(args.batch), "--repeats", str(args.repeats)]
    nearl = run_child(Path(__file__), "--child", "nearl", *common)
    full = run_child(Path(__file__), "--child", "full", *common)
    print(f"{'':<34}{'time (s)':>10}{'peak RSS (MiB)':>16}")
    print(f"{'frozen CLIP forward (no grad)':<34}{nearl['frozen_forward_s']:>10.3f}{'':>16}")
    print(f"{'NEARL train step':<34}{nearl['step_s']:>10.3f}{nearl['peak_mib']:>16.0f}")
    print(f"{'full fine-tuning step (AdamW)':<34}{full['step_s']:>10.3f}{full['peak_mib']:>16.0f}")
    result("train_step_vs_frozen_forward", nearl["step_s"], nearl["frozen_forward_s"], 2.5)
    result("train_step_vs_full_finetune", nearl["step_s"], full["step_s"], 1.0)
    result("train_peak_memory_vs_full_finetune", nearl["peak_mib"], full["peak_mib"], 0.6)


if __name__ == "__main__":
    sys.exit(main())
