"""Where a NEARL train step or prediction spends its time and memory (torch.profiler).

    python bench/profile_model.py                           # ViT-B-16, train step, per-image text
    python bench/profile_model.py --what predict --mode shared
    python bench/profile_model.py --what frozen             # the frozen CLIP forward, for comparison

Not a benchmark (no RESULT line): the tool behind the findings in docs/benchmarks.md.
Prints

* memory stages: resident memory after the imports, after building the model, and the
  peak during the profiled steps (``VmRSS`` / ``VmHWM`` of this process);
* forward time per component (frozen vision / text blocks, USEformer, OCAs, heads),
  from module hooks that open a ``record_function`` range around each call;
* the profiler's top operators by self CPU time, and by self memory allocated.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _mem() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MiB."""
    cur = peak = 0.0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            cur = int(line.split()[1]) / 1024
        elif line.startswith("VmHWM:"):
            peak = int(line.split()[1]) / 1024
    return cur, peak


def _reset_peak() -> None:
    try:  # Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


COMPONENTS = (  # (label, predicate on module path) - first match wins
    ("adapters: USEformer", lambda n: n.startswith("adapters.useformer.") and n.count(".") == 2),
    ("adapters: OCA vision", lambda n: n.startswith("adapters.oca_vision.") and n.count(".") == 2),
    ("adapters: OCA text", lambda n: n.startswith("adapters.oca_text.") and n.count(".") == 2),
    ("frozen: vision blocks", lambda n: n.startswith("clip.visual.transformer.resblocks.") and n.count(".") == 4),
    ("frozen: text blocks", lambda n: n.startswith("clip.transformer.resblocks.") and n.count(".") == 3),
)


def label_modules(model) -> list:
    """Forward hooks that wrap each component call in a profiler range named after it."""
    import torch

    handles = []
    for name, module in model.named_modules():
        label = next((lab for lab, pred in COMPONENTS if pred(name)), None)
        if label is None:
            continue

        def pre(mod, inputs, label=label):
            mod._nearl_range = torch.autograd.profiler.record_function(label)
            mod._nearl_range.__enter__()

        def post(mod, inputs, output):
            mod._nearl_range.__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--mode", default="per-image", choices=("per-image", "shared"))
    ap.add_argument("--what", default="train", choices=("train", "predict", "frozen"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=1, help="profiled steps after one warm-up step")
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args(argv)

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import bench_config, header
    from nearl_core.model import build_model
    from nearl_core.train import loss_fn, make_optimizer

    header(f"profile: {args.what}, {args.model}, text {args.mode}, batch {args.batch}")
    after_import = _mem()[0]
    torch.manual_seed(0)
    cfg = bench_config(args.model, args.mode)
    model = build_model(cfg)
    built_cur, built_peak = _mem()
    size = model.clip.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    x = torch.randn(args.batch, 3, *size)
    y = torch.arange(args.batch) % len(model.classes)
    opt = make_optimizer(model, cfg.train)
    if args.what == "train":
        model.train()

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autograd.profiler.record_function("step: forward + loss"):
                loss, _ = loss_fn(model, x, y, cfg.adapter.ortho_lambda)
            with torch.autograd.profiler.record_function("step: backward"):
                loss.backward()
            with torch.autograd.profiler.record_function("step: optimizer"):
                opt.step()
    elif args.what == "predict":
        model.eval()
        if args.mode == "shared":
            model.cache_text(True)

        def step():
            with torch.no_grad():
                model(x)
    else:
        model.eval()

        def step():
            model.zero_shot_logits(x)

    step()  # warm-up (and fills the text cache in shared predict mode)
    _reset_peak()
    before_steps = _mem()[0]
    handles = label_modules(model)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(args.steps):
            step()
    for h in handles:
        h.remove()
    _, steps_peak = _mem()

    print(f"\nmemory (MiB): after imports {after_import:.0f}; after building the model {built_cur:.0f} "
          f"(peak while building {built_peak:.0f}); before the profiled steps {before_steps:.0f}; "
          f"peak during them {steps_peak:.0f} (the profiler's own bookkeeping is included)")
    events = prof.key_averages()
    ranges = {e.key: e for e in events if e.key.startswith(("adapters:", "frozen:", "step:"))}
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\nforward time per component (cpu time incl. children, {args.steps} step(s)); total profiled "
          f"self CPU {total / 1e6:.2f}s")
    for key in sorted(ranges, key=lambda k: -ranges[k].cpu_time_total):
        e = ranges[key]
        print(f"  {key:<28}{e.cpu_time_total / 1e6:>9.3f}s  {e.count:>5} calls  "
              f"{100 * e.cpu_time_total / max(total, 1):>5.1f}%")
    print(f"\ntop {args.top} operators by self CPU time:")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=48))
    print(f"top {args.top} operators by self memory allocated:")
    print(events.table(sort_by="self_cpu_memory_usage", row_limit=args.top, max_name_column_width=48))
    by_shape = defaultdict(float)
    for e in events:
        if e.key.startswith("autograd::engine::evaluate_function"):
            by_shape[e.key.split(": ", 1)[-1]] += e.cpu_time_total
    if by_shape:
        print("backward functions by CPU time (incl. children):")
        for k, v in sorted(by_shape.items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"  {k:<48}{v / 1e6:>9.3f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
