"""Bench b: a NEARL train step vs the frozen forward (floor) and a full fine-tuning step.

    python bench/train_step.py                                  # ViT-B-16, batch 8, both text modes
    python bench/train_step.py --model nearl-tiny --repeats 2   # a quick run
    python bench/train_step.py --checkpoint-backbone            # the memory options (RESULT names get a suffix)
    python bench/train_step.py --micro-batch 2

Model: the shipped config (configs/vit-b16.yaml: adapter sizes, two prompt templates,
ortho-lambda 0.1) with random init, 2 classes; fp32 on the CPU, bf16 autocast on CUDA
(``--device auto`` picks CUDA when present, as training does).  A NEARL step is what a
site runs per batch: ``nearl_core.train.loss_fn`` (cross-entropy + orthogonal
regulariser), backward (``nearl_core.train.backward``, which also runs the
``train.micro-batch`` chunks), AdamW on the adapters.

Each arm runs in its own fresh process so that its peak memory (``ru_maxrss``) is its
own (on CUDA: ``torch.cuda.max_memory_allocated``).  The NEARL process also times the frozen CLIP's no-grad forward (open_clip's
``encode_image`` + ``encode_text`` of the class prompts, full 77-token context, the
zero-shot path) on the same batch, alternating with the train step, so the ratio
step / frozen-forward is measured side by side.  The full fine-tuning process runs
AdamW on every CLIP weight with the same batch and class prompts.
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
import torch.nn.functional as F  # noqa: E402

from common import bench_config, current_rss_mib, header, peak_rss_mib, result, run_child, timed_pairs  # noqa: E402

CLASSES = ("normal", "pneumonia")
MODES = ("per-image", "shared")


def _model(args, mode: str, options: bool = False):
    """The benchmark model; ``options``: with this run's train.checkpoint-backbone / train.micro-batch."""
    from nearl_core.config import apply_overrides
    from nearl_core.model import build_model

    torch.manual_seed(0)
    cfg = bench_config(args.model, mode, CLASSES)
    if options:
        cfg = apply_overrides(cfg, {"train.checkpoint-backbone": args.checkpoint_backbone,
                                    "train.micro-batch": args.micro_batch})
    return build_model(cfg), cfg


def _batch(model, batch: int, device: torch.device):
    size = model.clip.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, 3, *size, generator=g).to(device),
            (torch.arange(batch) % len(CLASSES)).to(device))


def _device(args) -> torch.device:
    from nearl_core.train import select_device

    device = select_device(args.device)
    return device if device.type in ("cpu", "cuda") else torch.device("cpu")


def _peak(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mib()


def child_nearl(args) -> dict:
    from nearl_core.train import autocast, backward, make_optimizer

    device = _device(args)
    base = current_rss_mib()  # torch and nearl_core imported, nothing built
    model, cfg = _model(args, args.mode, options=True)
    model = model.to(device)
    x, y = _batch(model, args.batch, device)
    opt = make_optimizer(model, cfg.train)
    model.train()
    lam = cfg.adapter.ortho_lambda

    def step():
        opt.zero_grad(set_to_none=True)
        backward(model, x, y, lam, micro_batch=cfg.train.micro_batch, device=device, amp=True)
        opt.step()

    def frozen_forward():
        with autocast(device, True):
            model.zero_shot_logits(x)  # no_grad inside

    cpu: list[list[float]] = []
    t_step, t_frozen = timed_pairs([step, frozen_forward], repeats=args.repeats, warmup=1,
                                   sync=device.type == "cuda", cpu=cpu)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"step_s": statistics.median(t_step), "frozen_forward_s": statistics.median(t_frozen),
            "pair_ratios": [s / f for s, f in zip(t_step, t_frozen)],
            "cpu_ratio": statistics.median(cpu[0]) / statistics.median(cpu[1]),
            "peak_mib": _peak(device), "base_mib": base, "trainable": trainable, "device": str(device)}


def child_full(args) -> dict:
    from nearl_core.train import autocast

    device = _device(args)
    base = current_rss_mib()
    model, _ = _model(args, "per-image")
    model = model.to(device)
    clip = model.clip
    for p in clip.parameters():
        p.requires_grad_(True)
    clip.train()
    x, y = _batch(model, args.batch, device)
    tokens, per_class = model.full_tokens, model.num_templates
    opt = torch.optim.AdamW(clip.parameters(), lr=1e-5)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(device, True):
            img = clip.encode_image(x, normalize=True)
            txt = clip.encode_text(tokens, normalize=True)
            txt = F.normalize(txt.reshape(len(CLASSES), per_class, -1).mean(1), dim=-1)
            loss = F.cross_entropy((clip.logit_scale.exp() * img @ txt.t()).float(), y)
        loss.backward()
        opt.step()

    (times,) = timed_pairs([step], repeats=args.repeats, warmup=1, sync=device.type == "cuda")
    return {"step_s": statistics.median(times), "peak_mib": _peak(device), "base_mib": base,
            "trainable": sum(p.numel() for p in clip.parameters())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--modes", default="per-image,shared", help="text-conditioning modes to run (comma list)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu or cuda")
    parser.add_argument("--checkpoint-backbone", action="store_true",
                        help="NEARL arms with train.checkpoint-backbone (RESULT names end in _checkpoint)")
    parser.add_argument("--micro-batch", type=int, default=0,
                        help="NEARL arms with train.micro-batch N (RESULT names end in _microN)")
    parser.add_argument("--child", choices=["nearl", "full"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="per-image", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps((child_nearl if args.child == "nearl" else child_full)(args)))
        return 0
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes takes a comma list of {', '.join(MODES)}")
    device = _device(args)
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    header(f"train step: {args.model} (random init, shipped config), batch {args.batch}, {len(CLASSES)} classes, "
           f"{precision}, {args.repeats} timed repeats after 1 warm-up, median", str(device))
    common = ["--model", args.model, "--batch", str(args.batch), "--repeats", str(args.repeats),
              "--device", str(device)]
    options = (["--checkpoint-backbone"] if args.checkpoint_backbone else []) + ["--micro-batch", str(args.micro_batch)]
    suffix = ("_checkpoint" if args.checkpoint_backbone else "") + (f"_micro{args.micro_batch}" if args.micro_batch else "")
    if suffix:
        print(f"# NEARL arms with train.checkpoint-backbone={args.checkpoint_backbone}, "
              f"train.micro-batch={args.micro_batch}")
    nearl = {m: run_child(Path(__file__), "--child", "nearl", "--mode", m, *common, *options) for m in modes}
    full = run_child(Path(__file__), "--child", "full", *common)
    memory = "peak CUDA (MiB)" if device.type == "cuda" else "peak RSS (MiB)"
    print(f"{'':<40}{'time (s)':>10}{memory:>16}{'trainable':>14}")
    first = nearl[modes[0]]
    print(f"{'frozen CLIP forward (no grad)':<40}{first['frozen_forward_s']:>10.3f}{'':>16}{'':>14}")
    for m in modes:
        n = nearl[m]
        print(f"{'NEARL train step, text ' + m:<40}{n['step_s']:>10.3f}{n['peak_mib']:>16.0f}{n['trainable']:>14,}")
        print(f"{'  (its frozen forward, same process)':<40}{n['frozen_forward_s']:>10.3f}")
        print(f"{'  step/forward per alternating pair':<40}  {' '.join(f'{r:.2f}' for r in n['pair_ratios'])}"
              f"  (median {statistics.median(n['pair_ratios']):.2f}; process CPU time ratio {n['cpu_ratio']:.2f})")
    print(f"{'full fine-tuning step (AdamW)':<40}{full['step_s']:>10.3f}{full['peak_mib']:>16.0f}{full['trainable']:>14,}")
    if device.type == "cpu":
        print(f"# resident memory after the imports, before building anything: NEARL {first['base_mib']:.0f} MiB, "
              f"full fine-tuning {full['base_mib']:.0f} MiB (torch, open_clip and what they import)")
        for m in modes:
            n = nearl[m]
            above = (n["peak_mib"] - n["base_mib"]) / max(full["peak_mib"] - full["base_mib"], 1e-9)
            print(f"# peak above that import baseline, NEARL {m} / full fine-tuning: {above:.3f}")
    timed = suffix == ""  # the time targets are the default path's; an option trades step time for memory
    for m in modes:
        n, tag = nearl[m], m.replace("-", "_") + suffix
        result(f"train_step_vs_frozen_forward_{tag}", n["step_s"], n["frozen_forward_s"], 2.2 if timed else None,
               unit="s")
        result(f"train_step_vs_full_finetune_{tag}", n["step_s"], full["step_s"], 1.0 if timed else None, unit="s")
        result(f"train_peak_memory_vs_full_finetune_{tag}", n["peak_mib"], full["peak_mib"], 0.6, unit="MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
