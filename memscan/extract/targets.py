"""What each chunk stores, in row order: the residual stream at --layers, then the --sites."""

from __future__ import annotations

from typing import Any

from memscan import models, sites
from memscan.layout import parse_layers


def plan_targets(layers: str, site_spec: str | None, loaded: models.LoadedModel) -> list[models.Target]:
    """What each chunk stores, in row order: the residual stream at `layers` (`none`: not at all), then the
    --sites grouped by site name in the order first named, blocks ascending (one module: path per site)."""
    targets = [] if layers == "none" else models.hidden_targets(parse_layers(layers, loaded.num_layers))
    if site_spec:
        hooked = sites.parse(site_spec, loaded.num_layers, loaded.model)
        names = list(dict.fromkeys(site_name(site) for site in hooked))
        hooked.sort(key=lambda site: (names.index(site_name(site)), -1 if site.block is None else site.block))
        targets += [models.Target(site_name(site), -1 if site.block is None else site.block, site) for site in hooked]
    return targets


def site_name(site: sites.Site) -> str:
    """The `site` column's value: a block site's name, or `module:PATH`."""
    return site.label if site.block is None else site.name


def site_records(targets: list[models.Target], widths: list[int]) -> list[dict[str, Any]]:
    """The manifest's `sites`: {name, layers, n} per site, in row order."""
    records: dict[str, dict[str, Any]] = {}
    for target, width in zip(targets, widths):
        record = records.setdefault(target.site, {"name": target.site, "layers": [], "n": width})
        record["layers"].append(target.layer)
    return list(records.values())
