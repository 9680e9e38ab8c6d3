"""Region names as users write them: the clouds' own, or a macro region.

A workload's ``regions`` may name cloud regions exactly (``us-east-1`` on AWS,
``us-central1`` on GCP) or the macro regions other serving products use (``US``,
``EU``, ``CANADA``, ``ASIA``, any case). A macro region stands for every region of
every provider on that continent, by the providers' own naming:

* ``US``: AWS ``us-*`` and GCP ``us-*`` (GovCloud excluded: it needs its own account);
* ``CANADA``: AWS ``ca-*`` and GCP ``northamerica-northeast*``;
* ``EU``: AWS ``eu-*`` and GCP ``europe-*``;
* ``ASIA``: AWS ``ap-*`` and GCP ``asia-*``, Australia and New Zealand excluded (AWS
  ``ap-southeast-2``, ``ap-southeast-4``, ``ap-southeast-6``; GCP ``australia-*``).

Anything else is refused when the spec is read, with these names, so a typo never
becomes a workload that silently matches no offer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

MACRO_REGIONS: dict[str, tuple[str, ...]] = {
    "US": ("us-",),
    "CANADA": ("ca-", "northamerica-northeast"),
    "EU": ("eu-", "europe-"),
    "ASIA": ("ap-", "asia-"),
}
"""Each macro region and the prefixes of the cloud region names it covers."""

_OUTSIDE_MACRO = frozenset({"ap-southeast-2", "ap-southeast-4", "ap-southeast-6"})
"""Regions a prefix would claim that lie elsewhere (Australia and New Zealand)."""

_AWS = r"(?:us|eu|ap|ca|sa|me|af|il|mx)-[a-z]+-[0-9]{1,2}"
_GCP = r"(?:us|europe|asia|australia|northamerica|southamerica|me|africa)-[a-z]+[0-9]{1,2}"
_MACRO = "|".join("".join(f"[{c}{c.lower()}]" for c in m) for m in ("US", "CANADA", "EU", "ASIA"))
REGION_PATTERN = rf"^(?:{_MACRO}|{_AWS}|{_GCP})(?!\n)$"
"""Every name :func:`normalise_region` accepts (the published schema carries it too)."""
_REGION = re.compile(REGION_PATTERN)


class UnknownRegionError(ValueError):
    """A region name that is neither a cloud region nor a macro region."""


def known_region_names() -> str:
    """What a region may be named, for error messages."""
    return (
        f"a macro region ({', '.join(MACRO_REGIONS)}) or a cloud region name such as "
        "us-east-1 (AWS) or us-central1 (GCP)"
    )


def normalise_region(name: str) -> str:
    """``name`` as stored: macro regions upper-case, cloud regions as given.

    Raises :class:`UnknownRegionError` naming what is allowed.
    """
    if not _REGION.match(name):
        raise UnknownRegionError(f"unknown region {name!r}; use {known_region_names()}")
    return name.upper() if name.upper() in MACRO_REGIONS else name


def macro_region_of(region: str) -> str | None:
    """The macro region a cloud region belongs to (``None``: none of them)."""
    if region in _OUTSIDE_MACRO:
        return None
    for macro, prefixes in MACRO_REGIONS.items():
        if region.startswith(prefixes):
            return macro
    return None


@dataclass(frozen=True, slots=True)
class RegionSet:
    """The regions a workload may use; empty means anywhere."""

    names: frozenset[str]

    @classmethod
    def of(cls, names: Iterable[str]) -> RegionSet:
        return cls(frozenset(names))

    def admits(self, region: str) -> bool:
        if not self.names or region in self.names:
            return True
        macro = macro_region_of(region)
        return macro is not None and macro in self.names

    def __bool__(self) -> bool:
        return bool(self.names)

    def describe(self) -> str:
        return ", ".join(sorted(self.names))
