"""The node's HTTP server: JSON API, pages, access rule, ``/docs`` offline, uvicorn in a thread.

:class:`HttpApi` (:mod:`server`) is the component ``triage serve`` runs; :func:`create_app`
(:mod:`api`) builds the JSON API, :func:`install` adds the pages (:mod:`pages`), ``/docs`` and
the access check (:mod:`access`); :func:`uvicorn_options` and :func:`base_url` give its TLS
options and address. The DICOMweb routes come from :mod:`dicom_node.dicomweb`.
"""

from dicom_node.web.api import create_app
from dicom_node.web.server import DOCS_CSP, HttpApi, base_url, install, uvicorn_options

__all__ = ["DOCS_CSP", "HttpApi", "base_url", "create_app", "install", "uvicorn_options"]
