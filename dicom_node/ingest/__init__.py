"""The ingest layer: what happens to a C-STORE data set between the network and the worklist.

In the order of the data flow: :mod:`~dicom_node.ingest.filemeta` (the file meta group put in
front of the data set), :mod:`~dicom_node.ingest.incoming` (one C-STORE, from its command to its
status), :mod:`~dicom_node.ingest.scanner` (structural check and identifying values),
:mod:`~dicom_node.ingest.durable` (fsync, rename, folder fsync),
:mod:`~dicom_node.ingest.spool` (spool layout, instance rows, group commit),
:mod:`~dicom_node.ingest.quarantine` (refused data) and :mod:`~dicom_node.ingest.recovery` (the
one start-up recovery routine). This layer never imports the network layer
(:mod:`dicom_node.net`); the receive stage (:mod:`dicom_node.stages.receive`) joins the two.
"""
