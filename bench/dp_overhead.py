"""DP-SGD overhead: one DP step / one plain step, same model, same batch, side by side.

    python bench/dp_overhead.py                        # ViT-B-16 (random init), batch 8, 2 classes
    python bench/dp_overhead.py --model nearl-tiny     # a quick run

A plain step is forward + backward + AdamW on the adapters.  A DP step is the same plus
Opacus' per-sample gradients (hooks on the adapters only), flat clipping, Gaussian noise
and the accountant.  Both run in fp32 (DP training turns autocast off).  Plain and DP
steps alternate after warm-up, so that both see the same load on a shared machine; the
baseline is the median plain step, the value the median DP step (wall clock).  Ends with
a ``RESULT`` line (target: ratio <= 1.5).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import opacus  # noqa: E402
import torch  # noqa: E402

from common import header, result  # noqa: E402
from nearl_core.config import from_dict  # noqa: E402
from nearl_core.model import build_model  # noqa: E402
from nearl_core.privacy import PrivateTraining  # noqa: E402
from nearl_core.train import loss_fn, make_optimizer, select_device  # noqa: E402

TARGET = 1.5


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-16", help="open_clip model name (random init); nearl-tiny for a quick run")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--classes", type=int, default=2)
    ap.add_argument("--mode", default="per-image", choices=("per-image", "shared"), help="adapter.text-conditioning")
    ap.add_argument("--repeats", type=int, default=4, help="timed (plain, DP) step pairs")
    ap.add_argument("--warmup", type=int, default=1, help="untimed (plain, DP) pairs first")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    device = select_device(args.device)
    torch.manual_seed(args.seed)
    cfg = from_dict({"model": {"name": args.model}, "adapter": {"text-conditioning": args.mode},
                     "train": {"batch-size": args.batch, "amp": False}})
    classes = tuple(f"class-{i}" for i in range(args.classes))
    model = build_model(cfg, classes).to(device).train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    size = model.clip.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    images = torch.randn(args.batch, 3, *size, generator=torch.Generator().manual_seed(args.seed)).to(device)
    labels = (torch.arange(args.batch) % args.classes).to(device)
    lam = cfg.adapter.ortho_lambda
    optimizer = make_optimizer(model, cfg.train)

    header("DP-SGD overhead: DP step / plain step (bench/dp_overhead.py)", str(device))
    print(f"# opacus {opacus.__version__}; model {args.model} (random init), text-conditioning {args.mode}, "
          f"{trainable:,} trainable adapter parameters, batch {args.batch}, {args.classes} classes, fp32, {args.warmup} warm-up + "
          f"{args.repeats} timed pairs of steps")

    def plain_step():
        loss, _ = loss_fn(model, images, labels, lam)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def dp_timed():  # Opacus is attached once per round in training, so attaching is not timed
        with PrivateTraining(model, optimizer, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.01,
                             expected_batch_size=args.batch) as dp:
            def step():
                dp.backward(images, labels, lam)
                dp.step()
            return _timed(step, device)

    for _ in range(args.warmup):
        plain_step()
        dp_timed()
    plain, private = [], []
    for _ in range(args.repeats):  # alternate, so that both see the same load on a shared machine
        plain.append(_timed(plain_step, device))
        private.append(dp_timed())

    wall = lambda rows: [w for w, _ in rows]
    cpu = lambda rows: [c for _, c in rows]
    baseline, value = statistics.median(wall(plain)), statistics.median(wall(private))
    pairs = statistics.median(d / p for d, p in zip(wall(private), wall(plain)))
    print(f"plain step wall (s): {' '.join(f'{t:.3f}' for t in wall(plain))}")
    print(f"DP step wall (s):    {' '.join(f'{t:.3f}' for t in wall(private))}")
    print(f"median of per-pair ratios {pairs:.3f}; process CPU time ratio "
          f"{statistics.median(cpu(private)) / statistics.median(cpu(plain)):.3f}")
    result("dp_overhead", value, baseline, TARGET, unit="s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
