"""Workload labels follow Kubernetes' rules, and selectors filter by them."""

from __future__ import annotations

import re
import sys

import jsonschema_rs
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from autoscaler.labels import (
    KEY_SCHEMA_PATTERN,
    SELECTOR_PATTERN,
    VALUE_SCHEMA_PATTERN,
    LabelError,
    Selector,
    metric_label_name,
)
from autoscaler.spec import WorkloadSpec

BASE = {"name": "chat", "slug": "chat", "model": "m"}


def test_labels_are_kept_sorted_and_are_not_part_of_what_a_replica_boots() -> None:
    spec = WorkloadSpec(**BASE, labels={"tier": "prod", "team": "search"})
    assert list(spec.labels) == ["team", "tier"]
    assert spec.replica_identity() == WorkloadSpec(**BASE).replica_identity()
    assert spec.spec_hash() != WorkloadSpec(**BASE).spec_hash()


@pytest.mark.parametrize(
    ("labels", "says"),
    [
        ({"team": "has space"}, "value 'has space' must be empty or 1-63"),
        ({"-team": "x"}, "label key '-team'"),
        ({"Example.com/team": "x"}, "prefix must be a lowercase DNS subdomain"),
        ({"t" * 64: "x"}, "the name must be 1-63"),
        ({f"k{i}": "v" for i in range(65)}, "at most 64 labels"),
    ],
)
def test_a_bad_label_is_refused_naming_it(labels: dict[str, str], says: str) -> None:
    with pytest.raises(ValidationError, match="labels") as info:
        WorkloadSpec(**BASE, labels=labels)
    assert says in str(info.value)


@pytest.mark.parametrize(
    ("selector", "chosen"),
    [
        ("", {"a", "b", "c"}),
        ("team=search", {"a", "b"}),
        ("team==search,tier=prod", {"a"}),
        ("team!=search", {"c"}),
        ("tier", {"a", "c"}),
        ("!tier", {"b"}),
        (" team = search , !tier ", {"b"}),
    ],
)
def test_selectors_choose_by_all_their_requirements(selector: str, chosen: set[str]) -> None:
    workloads = {
        "a": {"team": "search", "tier": "prod"},
        "b": {"team": "search"},
        "c": {"team": "ads", "tier": "batch"},
    }
    parsed = Selector.parse(selector)
    assert {name for name, labels in workloads.items() if parsed.matches(labels)} == chosen


@pytest.mark.parametrize("selector", ["team=a b", "!team=x", "=x", "team=search,=", "a/b/c=x"])
def test_a_selector_that_cannot_be_read_is_refused(selector: str) -> None:
    with pytest.raises(LabelError):
        Selector.parse(selector)


@given(st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,20}[A-Za-z0-9])?", fullmatch=True))
def test_every_valid_key_becomes_a_valid_prometheus_label_name(key: str) -> None:
    assert re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", metric_label_name(key))
    assert Selector.parse(f"{key}=v").matches({key: "v"})


@given(st.from_regex(SELECTOR_PATTERN))
def test_every_selector_the_published_pattern_admits_is_read(text: str) -> None:
    Selector.parse(text)


@given(st.text(alphabet="ab=!,/. -\n\tX_", max_size=12))
def test_a_selector_the_pattern_refuses_is_refused(text: str) -> None:
    if re.search(SELECTOR_PATTERN, text) is None:
        with pytest.raises(LabelError):
            Selector.parse(text)
    else:
        Selector.parse(text)


_SPACES = [chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()] + ["\ufeff"]


@pytest.mark.parametrize("space", _SPACES, ids=[hex(ord(c)) for c in _SPACES])
def test_the_published_pattern_read_as_ecma_262_takes_exactly_the_selectors_read(
    space: str,
) -> None:
    """JSON Schema's patterns are ECMA-262 (``jsonschema_rs`` reads them so), whose
    whitespace is not Python's: around a requirement, each kind of space is taken by the
    published pattern exactly when the server reads the selector."""
    published = jsonschema_rs.validator_for({"type": "string", "pattern": SELECTOR_PATTERN})
    for text in (f"team=a{space}", f"{space}team=a", f"team{space}=a,tier=b"):
        try:
            Selector.parse(text)
            read = True
        except LabelError:
            read = False
        assert published.is_valid(text) == read, repr(text)


@given(
    st.dictionaries(
        st.from_regex(KEY_SCHEMA_PATTERN),
        st.from_regex(VALUE_SCHEMA_PATTERN),
        max_size=3,
    )
)
def test_labels_the_published_schema_admits_are_accepted(labels: dict[str, str]) -> None:
    assert WorkloadSpec(**BASE, labels=labels).labels == dict(sorted(labels.items()))
