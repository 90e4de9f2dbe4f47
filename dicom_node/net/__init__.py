"""The DICOM network layer of the node: upper layer (PS3.8), DIMSE (PS3.7), access policy, TLS.

Modules, from the wire up: :mod:`~dicom_node.net.limits` (every bound in one place),
:mod:`~dicom_node.net.policy` (who may associate, and the PS3.8 Table 9-21 rejection codes).
"""
