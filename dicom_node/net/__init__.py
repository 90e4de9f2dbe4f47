"""The DICOM network layer of the node: upper layer (PS3.8), DIMSE (PS3.7), access policy, TLS.

Modules, from the wire up: :mod:`~dicom_node.net.limits` (every bound in one place),
:mod:`~dicom_node.net.pdu` (PDU types, A-ASSOCIATE-RJ and A-ABORT codes, the bounded check of
the A-ASSOCIATE-RQ), :mod:`~dicom_node.net.dimse` (command sets and statuses),
:mod:`~dicom_node.net.negotiation` (what we accept, the A-ASSOCIATE-AC),
:mod:`~dicom_node.net.policy` (who may associate), :mod:`~dicom_node.net.tls` (TLS contexts),
:mod:`~dicom_node.net.ulp` (one connection, Sta2 to Sta13), :mod:`~dicom_node.net.server`
(accepting, the caps); on the sending side :mod:`~dicom_node.net.scu` (the C-STORE SCU, over
pynetdicom) and :mod:`~dicom_node.net.tuning` (its socket hooks). The storage path is reached
only through the ``open_instance`` callable the receive stage (:mod:`dicom_node.stages.receive`)
passes in.
"""
