"""cxr-triage dicom_node package."""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())
