"""Workload labels and the selectors that filter by them.

Labels follow Kubernetes' rules, so the same keys work in both places and in
Prometheus: a key is an optional DNS-subdomain prefix and ``/``, then a name of at most
63 characters (letters, digits, ``-``, ``_``, ``.``, starting and ending with a letter
or digit); a value is empty or such a name. At most 64 labels per workload.

A selector is a comma-separated list of requirements, all of which must hold:
``team=search`` (or ``==``), ``team!=search``, ``team`` (has the key) and ``!team``
(lacks it). The metrics export each label as ``label_<key>`` (``.``, ``/`` and ``-``
become ``_``) on ``autoscaler_controller_workload_labels``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from pydantic.config import JsonDict

MAX_LABELS = 64

SPACE = r"[\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
"""One whitespace character as ``str.isspace`` counts it, spelled out for patterns that
are published: JSON Schema's patterns are ECMA-262, whose ``\\s`` is not Python's (it
leaves out U+001C-U+001F and U+0085, and takes in U+FEFF)."""

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?"
_PREFIX = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*"
KEY_PATTERN = rf"(?:{_PREFIX}/)?{_NAME}"
VALUE_PATTERN = rf"(?:{_NAME})?"
_REQUIREMENT = (
    rf"{SPACE}*(?:!{SPACE}*(?P<absent>{KEY_PATTERN})"
    rf"|(?P<key>{KEY_PATTERN})(?:{SPACE}*(?P<op>==|=|!=){SPACE}*(?P<value>{VALUE_PATTERN}))?)"
    rf"{SPACE}*"
)
_PART = rf"(?:{re.sub(r'[(][?]P<[a-z]+>', '(?:', _REQUIREMENT)}|{SPACE}*)"
SELECTOR_PATTERN = rf"^{_PART}(?:,{_PART})*$"
"""What a selector may be, as published in the API's schema; :meth:`Selector.parse`
accepts exactly this."""

KEY_SCHEMA_PATTERN = rf"^{KEY_PATTERN}(?!\n)$"
VALUE_SCHEMA_PATTERN = rf"^{VALUE_PATTERN}(?!\n)$"
LABELS_SCHEMA: JsonDict = {
    "maxProperties": MAX_LABELS,
    "propertyNames": {"pattern": KEY_SCHEMA_PATTERN},
    "additionalProperties": {"type": "string", "pattern": VALUE_SCHEMA_PATTERN},
}
"""The label rules as JSON Schema keywords, for the published spec schema."""

_NAME_RE = re.compile(_NAME)
_PREFIX_RE = re.compile(_PREFIX)
_REQUIREMENT_RE = re.compile(_REQUIREMENT)


class LabelError(ValueError):
    """A label or selector that breaks the rules; the message says which and why."""


def check_key(key: str) -> str:
    prefix, _, name = key.rpartition("/")
    if prefix and not _PREFIX_RE.fullmatch(prefix):
        raise LabelError(f"label key {key!r}: the prefix must be a lowercase DNS subdomain")
    if not _NAME_RE.fullmatch(name):
        raise LabelError(
            f"label key {key!r}: the name must be 1-63 letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit"
        )
    return key


def check_value(key: str, value: str) -> str:
    if value and not _NAME_RE.fullmatch(value):
        raise LabelError(
            f"label {key!r}: value {value!r} must be empty or 1-63 letters, digits, '-', '_' "
            "or '.', starting and ending with a letter or digit"
        )
    return value


def check_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """``labels`` checked, in key order; raises :class:`LabelError`."""
    if len(labels) > MAX_LABELS:
        raise LabelError(f"at most {MAX_LABELS} labels, got {len(labels)}")
    return {check_key(k): check_value(k, v) for k, v in sorted(labels.items())}


def metric_label_name(key: str) -> str:
    """The Prometheus label name for label ``key``: ``label_`` and the key, with every
    character Prometheus does not allow turned into ``_``."""
    return "label_" + re.sub(r"[^A-Za-z0-9_]", "_", key)


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "exists", "!exists"
    value: str = ""

    def holds(self, labels: Mapping[str, str]) -> bool:
        if self.op == "exists":
            return self.key in labels
        if self.op == "!exists":
            return self.key not in labels
        if self.op == "=":
            return labels.get(self.key) == self.value
        return labels.get(self.key) != self.value


@dataclass(frozen=True, slots=True)
class Selector:
    """Requirements that must all hold; the empty selector selects everything."""

    requirements: tuple[Requirement, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Selector:
        """Parse ``team=search,tier!=batch,gpu`` (raises :class:`LabelError`)."""
        requirements = []
        for part in text.split(","):
            if not part.strip():
                continue
            match = _REQUIREMENT_RE.fullmatch(part)
            if match is None:
                raise LabelError(
                    f"selector {text!r}: cannot read {part.strip()!r}; use key=value, "
                    "key!=value, key or !key (keys and values as labels have them), "
                    "separated by commas"
                )
            if match["absent"] is not None:
                requirements.append(Requirement(match["absent"], "!exists"))
            elif match["op"] is None:
                requirements.append(Requirement(match["key"], "exists"))
            else:
                op = "!=" if match["op"] == "!=" else "="
                requirements.append(Requirement(match["key"], op, match["value"]))
        return cls(tuple(requirements))

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.holds(labels) for r in self.requirements)
