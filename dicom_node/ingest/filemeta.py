"""The File Meta Information group (PS3.10 7.1) written in front of each received data set.

The C-STORE command gives everything the group needs (SOP class and instance, the negotiated
transfer syntax, the calling AE), so the data set is stored exactly as received, after the
preamble and this group, never decoded and re-encoded.
"""

from __future__ import annotations

import struct

from dicom_node.implementation import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

_PREAMBLE = b"\x00" * 128 + b"DICM"


def encode_file_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae: str
) -> bytes:
    """The File Meta Information group (PS3.10 7.1), explicit VR little endian, with the
    preamble and ``DICM`` prefix. Values longer than their VR allows are cut (such an instance
    is refused anyway; the file only goes to quarantine)."""

    def short(element: int, vr: bytes, value: bytes) -> bytes:
        return struct.pack("<HH", 0x0002, element) + vr + struct.pack("<H", len(value)) + value

    def uid(value: str) -> bytes:
        raw = value.encode("latin-1", "replace")[:64]
        return raw + b"\x00" if len(raw) % 2 else raw

    def text(value: str, limit: int) -> bytes:
        raw = value.encode("latin-1", "replace")[:limit]
        return raw + b" " if len(raw) % 2 else raw

    body = struct.pack("<HH", 0x0002, 0x0001) + b"OB\x00\x00" + struct.pack("<I", 2) + b"\x00\x01"
    body += short(0x0002, b"UI", uid(sop_class_uid))
    body += short(0x0003, b"UI", uid(sop_instance_uid))
    body += short(0x0010, b"UI", uid(transfer_syntax))
    body += short(0x0012, b"UI", uid(IMPLEMENTATION_CLASS_UID))
    body += short(0x0013, b"SH", text(IMPLEMENTATION_VERSION_NAME, 16))
    if source_ae:
        body += short(0x0016, b"AE", text(source_ae, 16))
    group_length = struct.pack("<HH", 0x0002, 0x0000) + b"UL" + struct.pack("<HI", 4, len(body))
    return _PREAMBLE + group_length + body
