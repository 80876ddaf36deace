"""Bench c: images per second of NEARL prediction vs zero-shot CLIP on the same images.

    python bench/inference.py                                  # ViT-B-16, batch 16
    python bench/inference.py --model nearl-tiny --repeats 2   # a quick run

Model: the shipped config (configs/vit-b16.yaml, two prompt templates) with random init,
2 classes, no gradients, eval mode, fp32 on the CPU and bf16 autocast on CUDA
(``--device auto`` picks CUDA when present): the forward that ``nearl predict`` runs per
batch.  Zero-shot CLIP encodes the class prompts once (template-averaged class
embeddings, cached) and then only the images.  NEARL in ``shared`` text mode caches its
class embeddings the same way (``cache_text``); ``per-image`` mode must run the text
tower for every image (reported too).  The three arms alternate, batch after batch,
so that they see the same load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import bench_config, header, result, timed_pairs  # noqa: E402
from nearl_core.backbone import build_backbone  # noqa: E402
from nearl_core.model import build_model  # noqa: E402
from nearl_core.train import autocast, select_device  # noqa: E402

CLASSES = ("normal", "pneumonia")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu or cuda")
    args = parser.parse_args()
    device = select_device(args.device)
    device = device if device.type in ("cpu", "cuda") else torch.device("cpu")
    cuda = device.type == "cuda"
    header(f"inference: {args.model} (random init, shipped config), batch {args.batch}, {len(CLASSES)} classes, "
           f"{'bf16 autocast' if cuda else 'fp32'}, {args.repeats} timed repeats after 1 warm-up, median", str(device))
    torch.manual_seed(0)
    models, backbone = {}, None
    for mode in ("shared", "per-image"):
        cfg = bench_config(args.model, mode, CLASSES)
        backbone = backbone or build_backbone(cfg.model)
        models[mode] = build_model(cfg, backbone=backbone).to(device).eval()
    shared, per_image = models["shared"], models["per-image"]
    shared.cache_text(True)
    clip = shared.clip
    size = clip.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    x = torch.randn(args.batch, 3, *size, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():  # zero-shot: class embeddings computed once, like NEARL shared with its cache
        text = clip.encode_text(shared.full_tokens, normalize=True)
        text_emb = F.normalize(text.reshape(len(CLASSES), shared.num_templates, -1).mean(1), dim=-1)
        # the zero-initialised adapters give the zero-shot logits: check that the arms compute the same thing
        reference = shared.zero_shot_logits(x)
        for name, m in models.items():
            err = (m(x).logits - reference).abs().max().item()
            print(f"# zero-initialised NEARL {name} vs zero-shot logits: max abs difference {err:.2e}")

    @torch.no_grad()
    def zero_shot():
        with autocast(device, True):
            return clip.logit_scale.exp() * clip.encode_image(x, normalize=True) @ text_emb.t()

    @torch.no_grad()
    def nearl_shared():
        with autocast(device, True):
            return shared(x).logits

    @torch.no_grad()
    def nearl_per_image():
        with autocast(device, True):
            return per_image(x).logits

    arms = {"zero-shot CLIP (cached text)": zero_shot, "NEARL shared (cached text)": nearl_shared,
            "NEARL per-image": nearl_per_image}
    times = timed_pairs(list(arms.values()), repeats=args.repeats, warmup=1, sync=cuda)
    ips = {name: args.batch / statistics.median(t) for name, t in zip(arms, times)}
    for name, v in ips.items():
        print(f"{name:<32}{v:>10.2f} images/s")
    zs = ips["zero-shot CLIP (cached text)"]
    result("inference_shared_vs_zero_shot", ips["NEARL shared (cached text)"], zs, 0.8, lower_is_better=False,
           unit="img/s")
    result("inference_per_image_vs_zero_shot", ips["NEARL per-image"], zs, 0.8, lower_is_better=False,
           unit="img/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
