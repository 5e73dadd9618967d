"""The code -> status table: .specs/errors.md, llorch.api.problems.STATUS, the OpenAPI enums."""

from __future__ import annotations

import functools
from typing import Any

import pytest

from llorch import errors
from llorch.api.problems import STATUS
from llorch.contracts import openapi
from tests.unit.helpers import REPO

DOCUMENTS = ("data", "control")


@functools.cache
def spec_table() -> dict[str, tuple[int, bool]]:
    """code -> (status, retriable) from the Markdown table of .specs/errors.md."""
    rows: dict[str, tuple[int, bool]] = {}
    text = (REPO / ".specs" / "errors.md").read_text(encoding="utf-8")
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) != 4 or not cells[1].isdigit():
            continue  # prose, the header row and the separator row
        assert cells[2] in ("yes", "no"), line
        for code in cells[0].split(","):
            assert code.strip() not in rows, f"{code} listed twice"
            rows[code.strip()] = (int(cells[1]), cells[2] == "yes")
    return rows


def schemas(document: str) -> dict[str, Any]:
    found: dict[str, Any] = openapi(document)["components"]["schemas"]
    return found


def domain_errors() -> list[type[errors.LlorchError]]:
    found: list[type[errors.LlorchError]] = []
    pending: list[type[errors.LlorchError]] = [errors.LlorchError]
    while pending:
        cls = pending.pop()
        # Classes that only group others (QueueFull, Unavailable) inherit their code.
        if "code" in vars(cls):
            found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


def test_the_spec_table_parses() -> None:
    table = spec_table()

    assert len(table) >= 28
    assert table["ALREADY_DRAINING"] == (409, False)
    assert table["RELOAD_IN_PROGRESS"] == (409, True)
    assert table["ADMISSION_REJECT"] == (429, True)


@pytest.mark.req("ORCH-ERR-0002")
def test_status_agrees_with_the_table_in_the_spec() -> None:
    documented = {code: status for code, (status, _) in spec_table().items()}
    assert documented == STATUS


@pytest.mark.req("ORCH-ERR-0002")
@pytest.mark.parametrize("document", DOCUMENTS)
def test_status_covers_exactly_the_error_codes_of_the_contract(document: str) -> None:
    enum = schemas(document)["ErrorCode"]["enum"]

    assert len(enum) == len(set(enum))
    assert set(STATUS) == set(enum)


@pytest.mark.req("ORCH-ERR-0006")
@pytest.mark.parametrize("schema", ["ErrorEnvelope", "ErrorCode"])
def test_both_documents_declare_the_same_error_schemas(schema: str) -> None:
    assert schemas("data")[schema] == schemas("control")[schema]


@pytest.mark.req("ORCH-ERR-0002")
def test_the_envelope_has_the_fields_of_the_spec() -> None:
    envelope = schemas("data")["ErrorEnvelope"]

    assert set(envelope["properties"]) == {
        "code",
        "message",
        "retriable",
        "retry_after_ms",
        "policy_label",
        "engine",
        "pool_id",
        "correlation_id",
    }
    assert set(envelope["required"]) == {"code", "message", "retriable", "correlation_id"}


@pytest.mark.req("ORCH-ERR-0002")
@pytest.mark.parametrize("cls", domain_errors(), ids=lambda cls: cls.__name__)
def test_each_domain_error_has_a_listed_code_and_its_retriable_flag(
    cls: type[errors.LlorchError],
) -> None:
    status, retriable = spec_table()[cls.code]

    assert STATUS[cls.code] == status
    assert cls.retriable is retriable, (
        f"{cls.__name__} ({cls.code}) says retriable={cls.retriable}; the table says {retriable}"
    )
