"""docs/conformance.md against the code: every table marked *checked* must say what the code
does (SOP classes, transfer syntaxes, limits, rejection and abort codes, statuses)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dicom_node.implementation import IMPLEMENTATION_CLASS_UID
from dicom_node.net import dimse, limits, negotiation, pdu
from dicom_node.settings import NodeSettings

DOC = Path(__file__).resolve().parents[2] / "docs" / "conformance.md"


def tables() -> list[tuple[list[str], list[list[str]]]]:
    """Every markdown table of the document: (header cells, rows of cells)."""
    out: list[tuple[list[str], list[list[str]]]] = []
    block: list[str] = []
    for line in [*DOC.read_text().splitlines(), ""]:
        if line.startswith("|"):
            block.append(line)
            continue
        if len(block) >= 2:
            cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in block]
            out.append((cells[0], cells[2:]))
        block = []
    return out


def table(*header: str) -> list[list[str]]:
    """The rows of the tables with exactly this header (concatenated in document order)."""
    found = [rows for head, rows in tables() if tuple(head) == header]
    assert found, f"no table with header {header} in {DOC.name}"
    return [row for rows in found for row in rows]


def uids(rows: list[list[str]], column: int) -> list[str]:
    return [row[column].strip("`") for row in rows]


def test_storage_sop_classes_are_the_accepted_ones() -> None:
    documented = uids(table("SOP Class Name", "SOP Class UID"), 1)
    assert len(documented) == len(set(documented))
    assert set(documented) == set(negotiation.storage_sop_classes())


def test_transfer_syntaxes_in_order() -> None:
    storage, verification = [
        rows for head, rows in tables() if tuple(head) == ("Transfer Syntax", "UID")
    ]
    assert uids(storage, 1) == list(negotiation.TRANSFER_SYNTAXES)
    assert uids(verification, 1) == list(negotiation.VERIFICATION_SYNTAXES)


def test_limits_table_holds_the_code_values() -> None:
    rows = table("Limit", "Value", "In the code")
    defaults = NodeSettings.model_fields
    seen = set()
    for _what, value, where in rows:
        module, name = where.strip("`").split(".")
        if module == "limits":
            actual = getattr(limits, name)
        else:
            assert module == "settings", where
            actual = defaults[name].default
        assert float(value) == pytest.approx(float(actual)), where
        seen.add(where.strip("`"))
    # every bound of limits.py that a peer can reach is documented
    for name in ("MAX_ASSOCIATE_RQ", "MAX_PRESENTATION_CONTEXTS", "MAX_TRANSFER_SYNTAXES",
                 "MAX_USER_INFORMATION_ITEMS",
                 "CONTROL_PDU_BODY", "MAX_COMMAND_SET", "READ_BUFFER_PENDING", "READ_BUFFER",
                 "MIN_PDU", "MAX_PDU", "CLOSE_LINGER"):  # fmt: skip
        assert f"limits.{name}" in seen, name
    for name in ("max_pdu_size", "artim_timeout", "network_timeout", "max_associations",
                 "max_pending_connections"):  # fmt: skip
        assert f"settings.{name}" in seen, name


def test_rejection_codes_are_the_ones_sent() -> None:
    rows = table("Result", "Source", "Reason", "Meaning", "When")
    documented = {(int(r), int(s), int(c), meaning, when) for r, s, c, meaning, when in rows}
    sent = {(j.result, j.source, j.reason, j.text, when) for when, j in pdu.REJECTIONS.items()}
    assert documented == sent


def test_abort_codes_are_the_ones_sent() -> None:
    rows = table("Source", "Reason", "Meaning", "When")
    documented = {(int(s), int(r), meaning) for s, r, meaning, _when in rows}
    assert documented == {(a.source, a.reason, a.text) for a in pdu.ABORTS}


def test_statuses_of_the_network_layer() -> None:
    rows = table("Status", "Meaning", "When")
    documented = {int(status, 16) for status, _meaning, _when in rows}
    answered = {value for name, value in vars(dimse).items() if name.startswith("STATUS_")}
    assert documented == answered


def test_implementation_class_uid() -> None:
    text = DOC.read_text()
    assert f"`{IMPLEMENTATION_CLASS_UID}`" in text
    assert re.search(r"PS3\.2", text)


def test_dicomweb_tables_hold_the_code() -> None:
    from dicom_node.dicomweb import catalog, frames, multipart, qido, rendering, router, stow

    routes = router.dicomweb_router(NodeSettings(), None, lambda: None)  # type: ignore[arg-type]
    served = {
        (method, route.path.removeprefix(router.ROOT))
        for route in routes.routes
        for method in getattr(route, "methods", ())
    }
    documented = {(m, r.strip("`")) for m, r, _service in table("Method", "Resource", "Service")}
    assert documented == served
    reasons = {int(code, 16) for code, _m, _w in table("Failure Reason", "Meaning", "When")}
    assert reasons == {v for k, v in vars(stow).items() if k.startswith("FAILURE_")}
    modules = {"multipart": multipart, "stow": stow, "qido": qido, "catalog": catalog}
    modules |= {"frames": frames, "rendering": rendering}
    for _what, value, where in table("DICOMweb limit", "Value", "In the code"):
        module, name = where.strip("`").split(".")
        if module == "settings":
            actual = NodeSettings.model_fields[name].default
        else:
            actual = getattr(modules[module], name)
        assert float(value) == pytest.approx(float(actual)), where
    for name in ("dicomweb_max_body", "dicomweb_max_part", "dicomweb_max_parts"):
        assert f"`settings.{name}`" in DOC.read_text(), name
