"""The methods NEARL is measured against: train step, peak memory and payload, each against NEARL.

    python bench/methods.py                                   # ViT-B-16 (random init), batch 4, CPU
    python bench/methods.py --model nearl-tiny --repeats 2    # a quick run
    python bench/methods.py --methods nearl,lora

Model: the shipped config (configs/vit-b16.yaml for ViT-B-16, configs/demo.yaml otherwise)
with random init, 2 classes, ``--set adapter.method=M`` for each method (docs/methods.md).
A step is what a site runs per batch: ``nearl_core.train.backward`` (cross-entropy, plus
NEARL's orthogonal regulariser) and AdamW on the method's trainable parameters.  Full
fine-tuning is timed past its size limit (the project refuses it above 50M weights for a
federation, not for a measurement).

Each method runs in its own fresh process, so that its peak memory is its own; the page
reports the peak resident memory above the process's import baseline (torch, open_clip
and nearl_core imported, nothing built): what the method itself costs, model included.
Methods run one after the other, not alternating, so the step-time ratios carry the
shared machine's load drift (the load average is in the header).  Payload = the bytes one
site moves per round (global weights down, update up, fp32).  Every RESULT line has NEARL
as its baseline and no target (``status=info``): these are comparisons, not goals.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from common import bench_config, current_rss_mib, header, peak_rss_mib, result, run_child, timed_pairs  # noqa: E402

CLASSES = ("normal", "pneumonia")
METHODS = ("nearl", "coop", "clip-adapter", "lora", "linear-probe", "full-ft")


def _model(args):
    from nearl_core.backbone import build_backbone
    from nearl_core.config import apply_overrides
    from nearl_core.methods.full_ft import FullFineTuneCLIP
    from nearl_core.model import build_model

    torch.manual_seed(0)
    cfg = apply_overrides(bench_config(args.model, "per-image", CLASSES), {"adapter.method": args.method})
    if args.method == "full-ft":
        return FullFineTuneCLIP(build_backbone(cfg.model), cfg, CLASSES, any_size=True), cfg
    return build_model(cfg, CLASSES), cfg


def child(args) -> dict:
    """One method in this process: build, time train steps, report memory, parameters and payload."""
    from nearl_core.params import parameter_report
    from nearl_core.train import backward, make_optimizer

    from nearl_core.backbone import _open_clip

    _open_clip()  # imported on first build otherwise, which would count its ~300 MiB as the method's
    device = torch.device("cpu")
    base = current_rss_mib()  # torch, open_clip and nearl_core imported, nothing built
    model, cfg = _model(args)
    size = model.clip.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, *size, generator=g)
    y = torch.arange(args.batch) % len(CLASSES)
    opt = make_optimizer(model, cfg.train)
    model.train()
    lam = cfg.adapter.ortho_lambda

    def step():
        opt.zero_grad(set_to_none=True)
        backward(model, x, y, lam, device=device, amp=False)
        opt.step()

    (times,) = timed_pairs([step], repeats=args.repeats, warmup=1)
    report = parameter_report(model)
    return {"step_s": statistics.median(times), "peak_mib": peak_rss_mib(), "base_mib": base,
            "trainable": report["trainable"], "payload_round": report["payload_bytes_per_round"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list; nearl is always measured first")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="nearl", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return 0
    chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
    if any(m not in METHODS for m in chosen):
        parser.error(f"--methods takes a comma list of {', '.join(METHODS)}")
    chosen = ["nearl"] + [m for m in chosen if m != "nearl"]
    header(f"methods: {args.model} (random init, shipped config), batch {args.batch}, {len(CLASSES)} classes, fp32, "
           f"{args.repeats} timed steps after 1 warm-up, median; one process per method")
    common = ["--model", args.model, "--batch", str(args.batch), "--repeats", str(args.repeats)]
    runs = {}
    for m in chosen:
        runs[m] = run_child(Path(__file__), "--child", "--method", m, *common)
        print(f"# measured {m}", flush=True)
    print(f"{'method':<14}{'trainable':>14}{'bytes/site/round':>18}{'step (s)':>10}{'peak above imports (MiB)':>26}")
    for m, r in runs.items():
        print(f"{m:<14}{r['trainable']:>14,}{r['payload_round']:>18,}{r['step_s']:>10.3f}"
              f"{r['peak_mib'] - r['base_mib']:>26.0f}")
    ref = runs["nearl"]
    for m, r in runs.items():
        if m == "nearl":
            continue
        tag = m.replace("-", "_")
        result(f"methods_train_step_{tag}_vs_nearl", r["step_s"], ref["step_s"], None, unit="s")
        result(f"methods_peak_memory_{tag}_vs_nearl", r["peak_mib"] - r["base_mib"], ref["peak_mib"] - ref["base_mib"],
               None, unit="MiB")
        result(f"methods_payload_{tag}_vs_nearl", r["payload_round"], ref["payload_round"], None, unit="B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
