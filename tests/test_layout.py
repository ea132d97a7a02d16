"""Key validation and the key <-> znode name mapping."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.coordination.layout import MAX_KEY_BYTES, Layout, escape, unescape, validate_key
from sidecar.errors import InvalidKey

keys = st.text(min_size=1, max_size=200).filter(
    lambda s: (
        1 <= len(s.encode("utf-8", "surrogatepass")) <= MAX_KEY_BYTES and not any(0xD800 <= ord(c) <= 0xDFFF for c in s)
    )
)


@given(keys)
def test_escape_round_trips_and_is_a_safe_znode_name(key: str) -> None:
    name = escape(key)
    assert unescape(name) == key
    assert "/" not in name and name not in (".", "..")
    assert all(0x21 <= ord(c) < 0x7F for c in name), name


@given(keys)
def test_version_path_maps_back_to_key(key: str) -> None:
    layout = Layout("/zkcache/ns")
    path = layout.version_path(key)
    assert path.startswith("/zkcache/ns/versions/")
    assert path.count("/") == 6  # root(2) + versions + bucket(2) + name
    assert layout.lock_path_of_version_path(path) == layout.lock_path(key)
    assert layout.key_of_version_path(path) == key


@given(st.text(max_size=50))
def test_prefix_entry_round_trip(prefix: str) -> None:
    layout = Layout("/r")
    base = layout.prefix_entry_base(prefix)
    name = base.rpartition("/")[2] + "0000000042"
    assert Layout.parse_prefix_entry(name) == (42, prefix)


def test_foreign_names_are_ignored() -> None:
    layout = Layout("/r")
    assert layout.key_of_version_path("/r/versions") is None
    assert layout.key_of_version_path("/r/epoch") is None
    assert Layout.parse_prefix_entry("lock-0001") is None


@pytest.mark.parametrize("key", ["", "x" * (MAX_KEY_BYTES + 1), "\udcff"])
def test_invalid_keys(key: str) -> None:
    with pytest.raises(InvalidKey):
        validate_key(key)


def test_dots_and_slashes_are_escaped() -> None:
    assert escape(".") == "%2E" and escape("..") == "%2E%2E"
    assert escape("a/b") == "a%2Fb"


def test_prefix_entries_with_bad_escapes_are_ignored_not_fatal() -> None:
    assert Layout.parse_prefix_entry("%FF~0000000001") is None
