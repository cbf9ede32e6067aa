"""Tests for protocol.handshake: what each side refuses in the other's hello.

Hellos pass through a JSON round trip first, so each test sees what a peer
would really send.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from protocol.framing import ProtocolError
from protocol.handshake import (
    MAX_POSITIONS,
    MAX_SIZE_CLASS,
    PROTOCOL_VERSION,
    Query,
    Refused,
    ServerOffer,
    ServerPolicy,
    check_client_hello,
    check_server_hello,
    client_hello,
    server_hello,
)
from protocol.he import DEFAULT_PARAMETERS
from protocol.spec import LinkageSpec, load_spec
from protocol.table import TableShape

SPEC = Path(__file__).resolve().parent.parent / "data" / "spec_default.json"
POLICY = ServerPolicy(("state", "sex"), ("age", "income"), 5, False)
QUERY = Query(("state", "sex"), "age", 5120, DEFAULT_PARAMETERS)
SHAPE = TableShape(("state", "sex"), (("nsw", "qld", "vic"), ("f", "m")))
GROUPS_PER_PASS = [1, 1, 2]


def wire(obj: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(obj))


@pytest.fixture(scope="module")
def spec() -> LinkageSpec:
    return load_spec(SPEC)


@pytest.fixture
def hello(spec: LinkageSpec) -> dict[str, Any]:
    """A good client hello, fresh for each test to change."""
    return wire(client_hello(spec, QUERY))


@pytest.fixture
def offer() -> dict[str, Any]:
    """A good server hello, fresh for each test to change."""
    positions = [[3], [0], [7, 2]]
    return wire(server_hello(SHAPE, positions, POLICY))


def raised(call, *args: Any) -> BaseException | None:
    try:
        call(*args)
    except Exception as exc:  # the tests below name the class they expect
        return exc
    return None


# -- the server's check of CLIENT_HELLO -------------------------------------------


def test_good_client_hello_gives_the_query(
    hello: dict[str, Any], spec: LinkageSpec
) -> None:
    assert check_client_hello(hello, spec, POLICY) == QUERY


def test_one_group_column_is_accepted(
    hello: dict[str, Any], spec: LinkageSpec
) -> None:
    hello["query"]["group_by"] = ["sex"]

    assert check_client_hello(hello, spec, POLICY).group_by == ("sex",)


def test_different_threshold_is_refused_naming_the_threshold(
    hello: dict[str, Any], spec: LinkageSpec
) -> None:
    hello["spec"]["threshold"] = 0.6

    with pytest.raises(Refused, match=r"threshold is 0\.55 here and 0\.6 there"):
        check_client_hello(hello, spec, POLICY)


def test_different_nested_field_is_refused_naming_its_path(
    hello: dict[str, Any], spec: LinkageSpec
) -> None:
    hello["spec"]["blocking"][1]["slots_per_bucket"] = 32

    with pytest.raises(Refused, match=r"blocking\[1\]\.slots_per_bucket"):
        check_client_hello(hello, spec, POLICY)


def test_missing_spec_is_refused(hello: dict[str, Any], spec: LinkageSpec) -> None:
    del hello["spec"]

    with pytest.raises(Refused, match="specifications differ"):
        check_client_hello(hello, spec, POLICY)


def test_group_column_outside_the_policy_is_refused(
    hello: dict[str, Any], spec: LinkageSpec
) -> None:
    hello["query"]["group_by"] = ["state", "postcode"]

    with pytest.raises(Refused, match="'postcode' is not allowed"):
        check_client_hello(hello, spec, POLICY)


@pytest.mark.parametrize("group_by", [
    ["state", "sex", "state"], ["state", "sex", "age"], [], ["state", "state"],
    "state", None,
])
def test_group_by_that_is_not_one_or_two_different_columns_is_refused(
    hello: dict[str, Any], spec: LinkageSpec, group_by: Any
) -> None:
    hello["query"]["group_by"] = group_by

    with pytest.raises(Refused, match="group_by"):
        check_client_hello(hello, spec, POLICY)


@pytest.mark.parametrize("value", ["postcode", "state", None, ["age"]])
def test_value_column_outside_the_policy_is_refused(
    hello: dict[str, Any], spec: LinkageSpec, value: Any
) -> None:
    hello["query"]["value"] = value

    with pytest.raises(Refused, match="averaging"):
        check_client_hello(hello, spec, POLICY)


def test_query_that_is_not_an_object_is_refused(
    hello: dict[str, Any], spec: LinkageSpec
) -> None:
    hello["query"] = ["state", "age"]

    with pytest.raises(Refused):
        check_client_hello(hello, spec, POLICY)


@pytest.mark.parametrize("size_class", [
    0, 1000, 1025, 5000, -1024, MAX_SIZE_CLASS + 1024, 1 << 40, True, 1024.0, "1024",
    None,
])
def test_bad_size_class_is_refused(
    hello: dict[str, Any], spec: LinkageSpec, size_class: Any
) -> None:
    hello["size_class"] = size_class

    with pytest.raises(Refused, match="size_class"):
        check_client_hello(hello, spec, POLICY)


@pytest.mark.parametrize("size_class", [1024, 2048, MAX_SIZE_CLASS])
def test_size_class_multiple_of_1024_up_to_the_maximum_is_accepted(
    hello: dict[str, Any], spec: LinkageSpec, size_class: int
) -> None:
    hello["size_class"] = size_class

    assert check_client_hello(hello, spec, POLICY).size_class == size_class


def test_client_hello_names_the_one_level_parameter_set(
    hello: dict[str, Any],
) -> None:
    assert hello["parameters"] == DEFAULT_PARAMETERS == "ckks-8192-60-40-60"


@pytest.mark.parametrize("name", [
    "ckks-4096-40-20-40", "", None, 7, "ckks-8192-60-40-40-60", "CKKS-8192-60-40-60",
])
def test_parameter_set_not_on_the_list_is_refused(
    hello: dict[str, Any], spec: LinkageSpec, name: Any
) -> None:
    hello["parameters"] = name

    with pytest.raises(Refused, match="allow-list"):
        check_client_hello(hello, spec, POLICY)


def test_retired_two_level_parameter_set_is_refused_naming_the_one_allowed(
    hello: dict[str, Any], spec: LinkageSpec
) -> None:
    # A client built before the one-level redesign asks for 60-40-40-60.
    hello["parameters"] = "ckks-8192-60-40-40-60"

    with pytest.raises(Refused, match=r"allow-list: ckks-8192-60-40-60$"):
        check_client_hello(hello, spec, POLICY)


@pytest.mark.parametrize("name", [[DEFAULT_PARAMETERS], {"name": DEFAULT_PARAMETERS}])
def test_parameter_set_that_is_a_list_or_object_is_refused(
    hello: dict[str, Any], spec: LinkageSpec, name: Any
) -> None:
    hello["parameters"] = name

    error = raised(check_client_hello, hello, spec, POLICY)

    assert isinstance(error, Refused), (
        "protocol bug: handshake.check_client_hello raises "
        f"{type(error).__name__}({error}) for the peer's hello with parameters "
        f"{name!r} (`in PARAMETER_SETS` needs a hashable value); expected Refused, "
        "so the server answers an internal error instead of naming the refusal"
    )


@pytest.mark.parametrize("version", [0, PROTOCOL_VERSION + 1, "1", None, [1]])
def test_wrong_protocol_version_is_refused(
    hello: dict[str, Any], spec: LinkageSpec, version: Any
) -> None:
    hello["protocol"] = version

    with pytest.raises(Refused, match="protocol version"):
        check_client_hello(hello, spec, POLICY)


@pytest.mark.parametrize("version", [True, 1.0])
def test_protocol_version_that_only_equals_one_is_refused(
    hello: dict[str, Any], spec: LinkageSpec, version: Any
) -> None:
    # The spec's own version and size_class refuse booleans; so should this.
    hello["protocol"] = version

    error = raised(check_client_hello, hello, spec, POLICY)

    assert isinstance(error, Refused), (
        "protocol bug: handshake.check_client_hello accepts protocol "
        f"{version!r} as version {PROTOCOL_VERSION} (compared with != only, so "
        "JSON true and 1.0 pass); expected Refused, as for a boolean size_class"
    )


def test_refused_is_a_protocol_error() -> None:
    assert issubclass(Refused, ProtocolError)


# -- the client's check of SERVER_HELLO -------------------------------------------


def test_good_server_hello_gives_the_offer(offer: dict[str, Any]) -> None:
    found = check_server_hello(offer, QUERY, GROUPS_PER_PASS)

    assert found == ServerOffer(SHAPE, [[3], [0], [7, 2]], 5, False)
    assert found.shape.cells == 6


def test_server_hello_for_other_group_columns_is_refused(
    offer: dict[str, Any],
) -> None:
    offer["group_by"] = ["sex", "state"]

    with pytest.raises(ProtocolError, match="shape"):
        check_server_hello(offer, QUERY, GROUPS_PER_PASS)


@pytest.mark.parametrize("categories", [
    [["nsw", "qld", "vic"]], [["nsw"], ["f"], ["m"]], [["nsw", 1], ["f"]], "nsw",
    [["nsw"], "f"],
])
def test_server_hello_with_categories_not_matching_the_query_is_refused(
    offer: dict[str, Any], categories: Any
) -> None:
    offer["categories"] = categories

    with pytest.raises(ProtocolError, match="shape"):
        check_server_hello(offer, QUERY, GROUPS_PER_PASS)


@pytest.mark.parametrize("positions", [
    [[3], [0]], [[3], [0], [7, 2], [1]], [[3], [0], [7]], [[3], [0], 9], "all",
])
def test_server_hello_with_position_lists_not_fitting_the_layout_is_refused(
    offer: dict[str, Any], positions: Any
) -> None:
    offer["positions"] = positions

    with pytest.raises(ProtocolError, match="layout"):
        check_server_hello(offer, QUERY, GROUPS_PER_PASS)


@pytest.mark.parametrize("bad", [-1, 2.0, True, "3", None])
def test_server_hello_with_a_bad_position_count_is_refused(
    offer: dict[str, Any], bad: Any
) -> None:
    offer["positions"][2][1] = bad

    with pytest.raises(ProtocolError, match="bad position counts"):
        check_server_hello(offer, QUERY, GROUPS_PER_PASS)


def test_server_hello_with_too_many_positions_in_all_is_refused(
    offer: dict[str, Any],
) -> None:
    offer["positions"] = [[MAX_POSITIONS // 2], [0], [MAX_POSITIONS // 2, 1]]

    with pytest.raises(ProtocolError, match="bad position counts"):
        check_server_hello(offer, QUERY, GROUPS_PER_PASS)


def test_server_hello_with_too_many_cells_is_refused(offer: dict[str, Any]) -> None:
    offer["categories"] = [[f"s{i}" for i in range(33)], [f"x{i}" for i in range(32)]]

    with pytest.raises(ProtocolError, match="1056 cells"):
        check_server_hello(offer, QUERY, GROUPS_PER_PASS)


def test_server_hello_with_an_empty_category_list_is_refused(
    offer: dict[str, Any],
) -> None:
    offer["categories"][1] = []

    with pytest.raises(ProtocolError, match="0 cells"):
        check_server_hello(offer, QUERY, GROUPS_PER_PASS)


@pytest.mark.parametrize("field, value", [
    ("min_cell_size", 0), ("min_cell_size", True), ("min_cell_size", 2.5),
    ("min_cell_size", None), ("reveal_counts", 1), ("reveal_counts", None),
])
def test_server_hello_with_bad_policy_fields_is_refused(
    offer: dict[str, Any], field: str, value: Any
) -> None:
    offer[field] = value

    with pytest.raises(ProtocolError, match="policy"):
        check_server_hello(offer, QUERY, GROUPS_PER_PASS)


def test_server_hello_is_not_changed_by_the_check(offer: dict[str, Any]) -> None:
    before = copy.deepcopy(offer)

    check_server_hello(offer, QUERY, GROUPS_PER_PASS)

    assert offer == before
