"""Measure proposed changes to the frozen-block path before anyone edits nearl_core.

    python bench/prototypes.py                          # ViT-B-16, per-image text, batch 8
    python bench/prototypes.py --model nearl-tiny --repeats 2

Not part of run_all and not a RESULT producer: it backs the proposals in
docs/benchmarks.md with numbers.  Each variant replaces ``nearl_core.towers._run_block``
(how a frozen open_clip block is called) *inside this benchmark's own process only*:

* ``current``       the code as it is: ``block(x, attn_mask=mask)``.  With gradients on,
                    ``nn.MultiheadAttention`` leaves its fused inference path and, because
                    the blocks are batch-first, projects q/k/v from a transposed
                    (non-contiguous) input, which torch runs as a batched matmul over
                    197 broadcast copies of the weight;
* ``seq-first``     the same call, with the attention input laid out sequence-first in
                    memory (one copy), so the projection is a single plain matmul;
* ``manual-attn``   the block written out: one q/k/v projection on the batch-first input,
                    ``scaled_dot_product_attention``, the output projection, the MLP;
* ``manual-attn+ckpt`` the same, each frozen block under ``torch.utils.checkpoint`` while
                    gradients are on (its activations are recomputed in the backward
                    pass instead of being kept).

Each variant runs in a fresh process: its outputs are checked against the current
path on the same weights, then its train step and the frozen no-grad forward alternate
(as in bench/train_step.py), and its peak RSS is its own.

``--blocks N`` instead times only the frozen vision blocks (the first N, batch-first
input that requires grad, as inside a NEARL step), every variant alternating in one
process: forward with gradients on, forward + backward, and the fused no-grad forward
that the frozen baseline uses.  Less noise on a shared machine than whole steps.
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

from common import bench_config, current_rss_mib, header, peak_rss_mib, run_child, timed_pairs  # noqa: E402

VARIANTS = ("current", "seq-first", "manual-attn", "manual-attn+ckpt")
CLASSES = ("normal", "pneumonia")


def _plain_block(block) -> bool:
    from open_clip.transformer import ResidualAttentionBlock

    return (isinstance(block, ResidualAttentionBlock) and not hasattr(block, "ln_1_kv")
            and isinstance(block.attn, torch.nn.MultiheadAttention) and block.attn._qkv_same_embed_dim)


def seq_first(block, x, mask):
    """open_clip's ResidualAttentionBlock.forward with the attention input stored sequence-first."""
    y = block.ln_1(x)
    q = y.transpose(0, 1).contiguous().transpose(0, 1)  # same (N, L, E) values, (L, N, E) memory
    m = mask.to(q.dtype) if mask is not None else None
    x = x + block.ls_1(block.attn(q, q, q, need_weights=False, attn_mask=m)[0])
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def manual_attn(block, x, mask):
    """The same block written out with one projection and scaled_dot_product_attention."""
    attn = block.attn
    n, length, e = x.shape
    h = attn.num_heads
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)  # (N, L, 3E), one plain matmul
    q, k, v = qkv.view(n, length, 3, h, e // h).permute(2, 0, 3, 1, 4).unbind(0)  # (N, h, L, e/h) each
    m = mask.to(q.dtype) if mask is not None else None
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    a = F.linear(a.transpose(1, 2).reshape(n, length, e), attn.out_proj.weight, attn.out_proj.bias)
    x = x + block.ls_1(a)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def install(variant: str) -> None:
    import nearl_core.towers as towers

    original = towers._run_block
    if variant == "current":
        return
    body = seq_first if variant == "seq-first" else manual_attn
    ckpt = variant.endswith("+ckpt")

    def run_block(block, x, mask, batch_first):
        if not (batch_first and torch.is_grad_enabled() and _plain_block(block)):
            return original(block, x, mask, batch_first)
        if ckpt and x.requires_grad:
            from torch.utils.checkpoint import checkpoint

            return checkpoint(body, block, x, mask, use_reentrant=False)
        return body(block, x, mask)

    towers._run_block = run_block


def child(args) -> dict:
    from nearl_core.model import build_model
    from nearl_core.train import loss_fn, make_optimizer

    base = current_rss_mib()
    torch.manual_seed(0)
    cfg = bench_config(args.model, args.mode, CLASSES)
    model = build_model(cfg)
    with torch.no_grad():  # non-zero adapter outputs, so the check covers the adapters' path too
        for p in model.adapters.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    size = model.clip.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    x = torch.randn(args.batch, 3, *size, generator=torch.Generator().manual_seed(0))
    y = torch.arange(args.batch) % len(CLASSES)
    model.train()
    reference = model(x).logits.detach()  # current path, gradients on
    install(args.variant)
    out = model(x).logits
    diff = (out.detach() - reference).abs().max().item()
    del out
    opt = make_optimizer(model, cfg.train)
    lam = cfg.adapter.ortho_lambda

    def step():
        opt.zero_grad(set_to_none=True)
        loss, _ = loss_fn(model, x, y, lam)
        loss.backward()
        opt.step()

    def frozen_forward():
        model.zero_shot_logits(x)

    t_step, t_frozen = timed_pairs([step, frozen_forward], repeats=args.repeats, warmup=1)
    return {"step_s": statistics.median(t_step), "frozen_s": statistics.median(t_frozen),
            "pairs": [s / f for s, f in zip(t_step, t_frozen)], "peak_mib": peak_rss_mib(), "base_mib": base,
            "max_abs_diff": diff}


def blocks_only(args) -> None:
    """Alternate the variants on the first N frozen vision blocks (see the module docstring)."""
    from nearl_core.backbone import build_backbone

    bodies = {"current": lambda b, x: b(x), "seq-first": lambda b, x: seq_first(b, x, None),
              "manual-attn": lambda b, x: manual_attn(b, x, None)}
    cfg = bench_config(args.model, args.mode, CLASSES)
    clip = build_backbone(cfg.model).clip.eval()
    blocks = list(clip.visual.transformer.resblocks)[: args.blocks]
    tokens = clip.visual.positional_embedding.shape[0]
    x0 = torch.randn(args.batch, tokens, clip.visual.transformer.width, generator=torch.Generator().manual_seed(0))

    def forward(body, grad: bool):
        x = x0.clone().requires_grad_(grad)
        y = x
        for b in blocks:
            y = body(b, y)
        return x, y

    outs = {name: forward(body, True)[1].detach() for name, body in bodies.items()}
    for name, out in outs.items():
        print(f"# {name}: max |diff| vs current {(out - outs['current']).abs().max().item():.2e}")

    def fwd(body):
        return lambda: forward(body, True)

    def fwd_bwd(body):
        def run():
            _, y = forward(body, True)
            y.sum().backward()
        return run

    def fused():
        with torch.no_grad():
            forward(bodies["current"], False)

    arms = {**{f"{n}: forward, grad on": fwd(b) for n, b in bodies.items()},
            **{f"{n}: forward + backward": fwd_bwd(b) for n, b in bodies.items()},
            "fused no-grad forward (the frozen baseline's path)": fused}
    times = timed_pairs(list(arms.values()), repeats=args.repeats, warmup=1)
    print(f"{'first ' + str(len(blocks)) + ' vision blocks, batch ' + str(args.batch):<56}{'median (s)':>12}")
    for name, t in zip(arms, times):
        print(f"{name:<56}{statistics.median(t):>12.3f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--mode", default="per-image", choices=("per-image", "shared"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--blocks", type=int, default=0, help="time only the first N frozen vision blocks (see above)")
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--full-peak-mib", type=float, default=None,
                    help="full fine-tuning peak RSS to compare with (default: measure it, as bench/train_step.py does)")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return 0
    if args.blocks:
        header(f"frozen vision blocks, three ways: {args.model}, batch {args.batch}, fp32")
        blocks_only(args)
        return 0
    variants = [v for v in args.variants.split(",") if v]
    header(f"prototypes of the frozen-block path: {args.model}, text {args.mode}, batch {args.batch}, fp32")
    common = ["--model", args.model, "--mode", args.mode, "--batch", str(args.batch), "--repeats", str(args.repeats)]
    rows = {v: run_child(Path(__file__), "--child", "--variant", v, *common) for v in variants}
    full = args.full_peak_mib
    if full is None:
        full = run_child(Path(__file__).with_name("train_step.py"), "--child", "full", "--model", args.model,
                         "--batch", str(args.batch), "--repeats", "1", "--device", "cpu")["peak_mib"]
    print(f"{'variant':<20}{'max |diff|':>12}{'step/frozen':>13}{'pairs':>22}{'peak RSS':>10}{'vs full FT':>12}")
    for v, r in rows.items():
        pairs = " ".join(f"{p:.2f}" for p in r["pairs"])
        print(f"{v:<20}{r['max_abs_diff']:>12.2e}{r['step_s'] / r['frozen_s']:>13.3f}{pairs:>22}"
              f"{r['peak_mib']:>10.0f}{r['peak_mib'] / full:>12.3f}")
    print(f"# full fine-tuning peak RSS {full:.0f} MiB; import baseline {rows[variants[0]]['base_mib']:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
