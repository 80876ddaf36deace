"""Parameter and payload accounting: what a method trains and what a site sends.

The same report for every method (``nearl params --set adapter.method=M``): the trainable
parameters are those of the one rule (``is_adapter_param``), the payload is their bytes in
one direction, and a round moves it twice per site (the global weights down, the update up).
"""

from __future__ import annotations

from nearl_core.model import FrozenCLIP
from nearl_core.personalize import adapter_groups, local_names

# display names of the parts each method reports (FrozenCLIP.components); others print as named
LABELS = {
    "useformer": "USEformer (queries + blocks)",
    "oca_vision": "OCA, vision tower",
    "oca_text": "OCA, text tower",
    "context": "context vectors (prompt)",
    "image": "adapter MLP on the image feature",
    "vision": "LoRA, vision tower",
    "text": "LoRA, text tower",
    "head": "linear head (classes x embedding)",
    "image_tower": "image tower",
    "text_tower": "text tower",
}
TITLES = {"nearl": "NEARL adapters", "coop": "CoOp context", "clip-adapter": "CLIP-Adapter",
          "lora": "LoRA updates", "linear-probe": "linear probe", "full-ft": "full fine-tuning"}


def parameter_report(model: FrozenCLIP) -> dict:
    """total / trainable / per-component counts and the payload in bytes (one direction and per round).

    The payload counts the shared tensors only: groups ``federation.local`` keeps at the
    sites never travel (they are listed under ``local``).
    """
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    adapters = model.adapter_parameters()
    trainable = sum(p.numel() for p in adapters.values())
    local = local_names(model)
    payload = sum(p.numel() * p.element_size() for n, p in adapters.items() if n not in local)
    return {
        "method": model.method,
        "backbone": model.backbone_name,
        "total": total,
        "trainable": trainable,
        "trainable_fraction": trainable / max(total, 1),
        "payload_bytes": payload,
        "payload_bytes_per_round": 2 * payload,  # per site: the global weights down, the update up
        "full_model_bytes": sum(p.numel() * p.element_size() for p in params),
        "components": {**model.components(), "backbone_frozen": total - trainable},
        "dimensions": model.dimensions(),
        "groups": {g: sum(adapters[n].numel() for n in names) for g, names in adapter_groups(model).items()},
        "local": {"groups": list(model.cfg.federation.local), "parameters": sum(adapters[n].numel() for n in local)},
    }


def format_report(report: dict) -> str:
    c, d = report["components"], report["dimensions"]
    title = TITLES.get(report["method"], report["method"])
    rows = [(LABELS.get(k, k), n) for k, n in c.items() if k != "backbone_frozen"]
    rows += [(f"trainable ({title})", report["trainable"]), ("frozen CLIP backbone", c["backbone_frozen"]),
             ("total", report["total"])]
    sizes = ", ".join(f"{k}={v}" for k, v in d.items() if k not in ("vision_layers", "text_layers",
                                                                    "vision_width", "text_width"))
    lines = [
        f"{title} ({report['method']}) on {report['backbone']}: {sizes}; layers vision/text "
        f"{d['vision_layers']}/{d['text_layers']}, widths {d['vision_width']}/{d['text_width']}",
        "",
    ]
    lines += [f"  {name:<34}{n:>14,}" for name, n in rows]
    lines += [
        "",
        f"  trainable fraction                {100 * report['trainable_fraction']:>13.3f}%",
        f"  adapter groups (federation.local) {', '.join(report['groups'])}",
        *([f"  kept at each site                 {report['local']['parameters']:>14,}  "
           f"({', '.join(report['local']['groups'])}; never sent)"] if report["local"]["parameters"] else []),
        f"  payload per direction             {report['payload_bytes']:>14,} bytes ({report['payload_bytes'] / 2**20:.2f} MiB)",
        f"  per site per round (down + up)    {report['payload_bytes_per_round']:>14,} bytes",
        f"  full model (fine-tuning)          {report['full_model_bytes']:>14,} bytes ({report['full_model_bytes'] / 2**20:.1f} MiB)",
    ]
    return "\n".join(lines)
