"""DIMSE command sets (PS3.7 6.3, 9.3, E): decoding requests and encoding responses.

A command set is group 0000 in implicit VR little endian; ours are read into a dict of raw
values and only the few elements the node acts on are interpreted.
"""

from __future__ import annotations

import struct

from dicom_node.net.pdu import ABORT_BY_USER, ProtocolError

# Command Field values (PS3.7 E.1)
C_STORE_RQ = 0x0001
C_ECHO_RQ = 0x0030
C_CANCEL_RQ = 0x0FFF
#: Command Data Set Type "no data set" (PS3.7 E.1)
NO_DATASET = 0x0101

# Command set elements (0000,xxxx)
AFFECTED_SOP_CLASS = 0x0002
COMMAND_FIELD = 0x0100
MESSAGE_ID = 0x0110
MESSAGE_ID_RESPONDED = 0x0120
DATASET_TYPE = 0x0800
STATUS = 0x0900
AFFECTED_SOP_INSTANCE = 0x1000

# Statuses we answer with (PS3.7 C, PS3.4 B.2.3)
STATUS_SUCCESS = 0x0000
#: the Affected SOP Class is not the abstract syntax of the message's presentation context
#: (PS3.7 Annex C general status "Refused: SOP Class Not Supported"; pynetdicom answers the same)
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
#: a command this node does not offer (C-FIND, C-MOVE, N-...)
STATUS_UNRECOGNIZED_OPERATION = 0x0211
#: a C-STORE-RQ that announced no data set
STATUS_CANNOT_UNDERSTAND = 0xC210


class DimseError(ProtocolError):
    """A command set we cannot act on: our application aborts (source service-user)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ABORT_BY_USER)


def decode_command(data: bytes | bytearray | memoryview) -> dict[int, bytes]:
    """Command set (implicit VR little endian, group 0000) -> ``{element: value bytes}``."""
    out: dict[int, bytes] = {}
    view = memoryview(data)
    pos, end = 0, len(view)
    while pos < end:
        if pos + 8 > end:
            raise DimseError(f"command set ends inside an element header at byte {pos}")
        group, element, length = struct.unpack_from("<HHI", view, pos)
        pos += 8
        if group != 0x0000:
            raise DimseError(f"command set holds ({group:04X},{element:04X})")
        if length > end - pos:
            raise DimseError(f"command element (0000,{element:04X}) overruns the command set")
        out[element] = bytes(view[pos : pos + length])
        pos += length
    return out


def command_us(command: dict[int, bytes], element: int) -> int | None:
    """An US value of the command set, ``None`` when absent or not 2 bytes."""
    value = command.get(element)
    if value is None or len(value) != 2:
        return None
    return int(struct.unpack("<H", value)[0])


def command_uid(command: dict[int, bytes], element: int) -> str:
    """A UI value of the command set without its padding ("" when absent)."""
    return command.get(element, b"").decode("latin-1").rstrip("\x00 ")


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _uid_value(uid: str) -> bytes:
    raw = uid.encode("latin-1", "replace")[:64]
    return raw + b"\x00" if len(raw) % 2 else raw


def encode_response(
    command_field: int,
    message_id: int,
    status: int,
    sop_class_uid: str = "",
    sop_instance_uid: str = "",
) -> bytes:
    """A response command set (no data set), with its group length."""
    body = b""
    if sop_class_uid:
        body += _element(AFFECTED_SOP_CLASS, _uid_value(sop_class_uid))
    body += _element(COMMAND_FIELD, struct.pack("<H", command_field))
    body += _element(MESSAGE_ID_RESPONDED, struct.pack("<H", message_id))
    body += _element(DATASET_TYPE, struct.pack("<H", NO_DATASET))
    body += _element(STATUS, struct.pack("<H", status))
    if sop_instance_uid:
        body += _element(AFFECTED_SOP_INSTANCE, _uid_value(sop_instance_uid))
    return _element(0x0000, struct.pack("<I", len(body))) + body
