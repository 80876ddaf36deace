"""Parameter and payload accounting: what NEARL trains and what a site sends."""

from __future__ import annotations

from torch import nn

from nearl_core.model import NearlCLIP


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_report(model: NearlCLIP) -> dict:
    """total / trainable / per-component counts and the adapter payload in bytes (one direction)."""
    a = model.adapters
    components = {
        "useformer": _count(a.useformer) + _count(a.queries),
        "oca_vision": _count(a.oca_vision),
        "oca_text": _count(a.oca_text),
        "backbone_frozen": _count(model.clip),
    }
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "backbone": model.backbone_name,
        "total": _count(model),
        "trainable": trainable,
        "trainable_fraction": trainable / max(_count(model), 1),
        "payload_bytes": sum(p.numel() * p.element_size() for p in a.parameters()),
        "full_model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "components": components,
        "dimensions": {
            "queries": model.cfg.adapter.queries, "width": model.cfg.adapter.width,
            "rank": model.cfg.adapter.rank, "heads": model.cfg.adapter.heads,
            "vision_layers": len(a.oca_vision), "text_layers": len(a.oca_text),
            "vision_width": model.vision.width, "text_width": model.text.width,
        },
    }


def format_report(report: dict) -> str:
    c = report["components"]
    rows = [
        ("USEformer (queries + blocks)", c["useformer"]),
        ("OCA, vision tower", c["oca_vision"]),
        ("OCA, text tower", c["oca_text"]),
        ("trainable (NEARL adapters)", report["trainable"]),
        ("frozen CLIP backbone", c["backbone_frozen"]),
        ("total", report["total"]),
    ]
    d = report["dimensions"]
    lines = [
        f"NEARL on {report['backbone']}: M={d['queries']} queries, d={d['width']}, r={d['rank']}, "
        f"{d['heads']} heads; layers vision/text {d['vision_layers']}/{d['text_layers']}, "
        f"widths {d['vision_width']}/{d['text_width']}",
        "",
    ]
    lines += [f"  {name:<32}{n:>14,}" for name, n in rows]
    lines += [
        "",
        f"  trainable fraction              {100 * report['trainable_fraction']:>13.3f}%",
        f"  adapter payload per direction   {report['payload_bytes']:>14,} bytes ({report['payload_bytes'] / 2**20:.2f} MiB)",
        f"  full model (fine-tuning)        {report['full_model_bytes']:>14,} bytes ({report['full_model_bytes'] / 2**20:.1f} MiB)",
    ]
    return "\n".join(lines)
