"""Bench c: images per second of NEARL prediction vs zero-shot CLIP on the same images.

    python bench/inference.py [--model ViT-B-16] [--batch 16] [--repeats 3]

Zero-shot CLIP encodes the class prompts once and then only the images. NEARL in
``shared`` text mode caches its class embeddings the same way; ``per-image`` mode must
run the text tower for every image (reported too).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from common import header, median_time, result
from nearl_core.backbone import build_backbone
from nearl_core.config import from_dict
from nearl_core.model import build_model

CLASSES = ("normal", "pneumonia")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    header(f"inference: {args.model}, batch {args.batch}, {len(CLASSES)} classes")
    torch.manual_seed(0)
    models = {}
    backbone = None
    for mode in ("shared", "per-image"):
        cfg = from_dict({"model": {"name": args.model}, "adapter": {"text-conditioning": mode},
                         "task": {"classes": list(CLASSES)}})
        backbone = backbone or build_backbone(cfg.model)
        models[mode] = build_model(cfg, backbone=backbone).eval()
    shared, per_image = models["shared"], models["per-image"]
    shared.cache_text(True)
    clip = shared.clip
    x = torch.randn(args.batch, 3, *clip.visual.image_size)
    with torch.no_grad():
        text_emb = F.normalize(clip.encode_text(shared.full_tokens), dim=-1)  # cached once, like NEARL shared

    @torch.no_grad()
    def zero_shot():
        return clip.logit_scale.exp() * F.normalize(clip.encode_image(x), dim=-1) @ text_emb.t()

    @torch.no_grad()
    def nearl_shared():
        return shared(x).logits

    @torch.no_grad()
    def nearl_per_image():
        return per_image(x).logits

    ips = {name: args.batch / median_time(fn, repeats=args.repeats)
           for name, fn in (("zero-shot CLIP", zero_shot), ("NEARL shared (cached text)", nearl_shared),
                            ("NEARL per-image", nearl_per_image))}
    for name, v in ips.items():
        print(f"{name:<30}{v:>10.2f} images/s")
    result("inference_shared_vs_zero_shot", ips["NEARL shared (cached text)"], ips["zero-shot CLIP"], 0.8,
           lower_is_better=False)
    result("inference_per_image_vs_zero_shot", ips["NEARL per-image"], ips["zero-shot CLIP"], 0.8,
           lower_is_better=False)


if __name__ == "__main__":
    main()
