"""Every bound the network layer enforces, in one place.

docs/conformance.md lists the same values (a test compares them). Sizes are bytes, times
seconds. What a single connection can make the server hold in memory follows from these:
one read buffer (:data:`READ_BUFFER_PENDING` before association, :data:`READ_BUFFER` after),
one A-ASSOCIATE-RQ of at most :data:`MAX_ASSOCIATE_RQ` bytes while it is decoded, and one
command set of at most :data:`MAX_COMMAND_SET` bytes. Data set fragments are never held: they
go to the instance's file as they arrive, whatever the PDU length says.
"""

from __future__ import annotations

from dataclasses import dataclass

#: PDU header: type (1), reserved (1), length (4) (PS3.8 9.3.1).
PDU_HEADER = 6
#: PDV item header inside a P-DATA-TF: length (4), context ID (1), control header (1).
PDV_HEADER = 6
#: A-ASSOCIATE-RQ fixed fields after the PDU header: version, reserved, called AE, calling AE,
#: reserved (2 + 2 + 16 + 16 + 32 bytes, PS3.8 Table 9-11).
ASSOCIATE_RQ_FIXED = 68
#: Largest A-ASSOCIATE-RQ body we read. DCMTK's ``storescu`` proposes about 14 KB (128
#: contexts, 3 transfer syntaxes each); decoding costs about 15 bytes of memory and 4 us of
#: CPU per byte (pynetdicom validates every UID), so the bound also bounds that work.
MAX_ASSOCIATE_RQ = 64 << 10
#: Presentation contexts in one request: context IDs are odd numbers 1-255 (PS3.8 9.3.2.2).
MAX_PRESENTATION_CONTEXTS = 128
#: Transfer syntaxes proposed for one presentation context.
MAX_TRANSFER_SYNTAXES = 32
#: Sub-items of the user information item: maximum length, implementation class and version,
#: asynchronous operations, user identity, and per SOP class at most a role selection, an
#: extended and a common extended negotiation (3 x 128). 15,000 empty sub-items cost
#: pynetdicom 2.7 MiB and 0.5 s of CPU to decode; 512 cost a few percent of that.
MAX_USER_INFORMATION_ITEMS = 512
#: Body of A-RELEASE-RQ, A-RELEASE-RP and A-ABORT: exactly 4 bytes (PS3.8 9.3.6-9.3.8).
CONTROL_PDU_BODY = 4
#: Largest command set (all fragments together); a C-STORE-RQ's is about 200 bytes.
MAX_COMMAND_SET = 64 << 10
#: Read buffer of a connection that has not associated yet.
READ_BUFFER_PENDING = 64 << 10
#: Read buffer of an association (data set pieces pass through it to the file).
READ_BUFFER = 1 << 20
#: Range of the ``max_pdu_size`` setting (our Maximum Length Received, PS3.8 D.1).
MIN_PDU = 4096
MAX_PDU = 16 << 20
#: After our last PDU (A-RELEASE-RP, A-ASSOCIATE-RJ, A-ABORT) we wait this long for the peer
#: to close (PS3.8 Sta13) and read at most :data:`CLOSE_DRAIN` bytes meanwhile.
CLOSE_LINGER = 1.0
CLOSE_DRAIN = 64 << 10
#: Negotiation answers kept (keyed by a digest of the request).
NEGOTIATION_CACHE = 64
#: At most one warning per this many seconds about connections evicted at the pending cap.
EVICTION_LOG_INTERVAL = 10.0


@dataclass(frozen=True)
class Limits:
    """The bounds that come from settings, with the fixed ones above."""

    max_pdu: int = 1 << 20
    artim_timeout: float = 10.0
    network_timeout: float = 60.0
    max_associations: int = 16
    max_pending: int = 32
