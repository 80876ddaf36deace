"""A site's data folder checked against the config: what `nearl check-data` and `nearl-client` run first.

Kept apart from :mod:`nearl_core.workflows` so that a site's start-up check imports the
data layer only, not the training stack (Opacus alone is 1.5 s of imports).
"""

from __future__ import annotations

from pathlib import Path

from nearl_core.config import NearlConfig
from nearl_core.data import SiteData, format_counts, infer_classes, scan_site


def with_site_classes(cfg: NearlConfig, data: Path, log=print) -> NearlConfig:
    """Classes from the config, or (when it names none) from the site's train folders."""
    if cfg.task.classes:
        return cfg
    classes = infer_classes(data)
    log(f"classes from {data / 'train'} (sorted folder names): {', '.join(classes)}")
    return cfg.with_classes(classes)


def classes_of_data(cfg: NearlConfig, found: tuple[str, ...], where: Path | str, log=print) -> NearlConfig:
    """The classes when no config names them: the default config's list (its order, which the demo's
    federation uses) when the data holds exactly those classes, else the data's own, sorted and printed."""
    if set(found) == set(cfg.task.classes):
        return cfg
    log(f"classes from {where} (sorted folder names): {', '.join(found)}")
    return cfg.with_classes(tuple(found))


def load_site(cfg: NearlConfig, data: Path, log=print) -> SiteData:
    site = scan_site(data, cfg.task.classes, verify=True)
    missing = site.missing_classes("train")
    if missing:
        log(f"note: site {data} has no training images of {', '.join(missing)} (valid for non-IID federations)")
    return site


def check_data(data: Path, cfg: NearlConfig) -> SiteData:
    cfg = with_site_classes(cfg, data)
    site = load_site(cfg, data)
    print(f"site {data}: OK ({sum(len(s) for s in site.splits.values())} images, classes {', '.join(site.classes)})")
    print(format_counts(site))
    return site
