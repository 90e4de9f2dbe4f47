"""Prometheus metrics of the node: counters the node and workers increment, gauges from the DB.

One :class:`Metrics` object per process (built by the serve/worker command, passed to the C-STORE
handlers, the workers, the delivery sender and :func:`dicom_node.web.api.create_app`). Each object
has its own :class:`prometheus_client.CollectorRegistry`: nothing is registered in the global
registry, so several nodes (or tests) can live in one process.

Metric names (all prefixed ``triage_``)
---------------------------------------
Incremented by the code that does the work:

- ``triage_instances_received_total`` (``.instances_received.inc()``): new instances stored.
- ``triage_instances_rejected_total{reason}`` (``.instances_rejected.labels(reason=...).inc()``):
  C-STORE requests refused (``undecodable``, ``invalid_uid``, ``disk_full``, ...).
- ``triage_studies_processed_total{status}`` (``.studies_processed.labels(status=...).inc()``):
  studies finished by a worker (``done``, ``not_eligible``, ``failed``).
- ``triage_inference_seconds`` (``.inference_seconds.observe(s)``; histogram): time to triage
  one study (model, Grad-CAM and output building).
- ``triage_deliveries_sent_total`` / ``triage_deliveries_failed_total``
  (``.deliveries_sent.inc()`` / ``.deliveries_failed.inc()``): C-STORE attempts of results.

Read from the worklist at scrape time (when a worklist is attached):

- ``triage_studies{status}``: studies per lifecycle status (every status, zeros included).
- ``triage_queue_depth``: studies waiting for a worker (``queued``).
- ``triage_deliveries{status}``: deliveries per status.
- ``triage_database_up``: 1 when the worklist answered, 0 otherwise (the other DB gauges are
  then absent from that scrape).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric

from triage_core.errors import WorklistError

if TYPE_CHECKING:
    from triage_core.worklist import Worklist

logger = logging.getLogger(__name__)

#: Histogram buckets of ``triage_inference_seconds`` (CPU studies take 0.05 s to tens of s).
INFERENCE_BUCKETS: tuple[float, ...] = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)


class _WorklistCollector:
    """Gauges computed from the worklist when Prometheus scrapes."""

    def __init__(self, worklist: Worklist) -> None:
        self._worklist = worklist

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily("triage_database_up", "1 when the worklist database answered"),
            GaugeMetricFamily("triage_studies", "Studies per lifecycle status", labels=["status"]),
            GaugeMetricFamily("triage_queue_depth", "Studies queued and waiting for a worker"),
            GaugeMetricFamily(
                "triage_deliveries", "Result deliveries per status", labels=["status"]
            ),
        )

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        up, studies, depth, deliveries = self._families()
        try:
            counts = self._worklist.queries.counts_by_status()
            delivery_counts = self._worklist.queries.delivery_counts_by_status()
        except WorklistError as exc:
            logger.warning("metrics: worklist unavailable: %s", exc)
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        for status, n in counts.items():
            studies.add_metric([status], float(n))
        depth.add_metric([], float(counts.get("queued", 0)))
        for status, n in delivery_counts.items():
            deliveries.add_metric([status], float(n))
        yield from (up, studies, depth, deliveries)


class Metrics:
    """The node's metrics, in a registry of their own.

    Parameters
    ----------
    worklist : Worklist, optional
        When given, DB gauges (studies by status, queue depth, deliveries) are read from it at
        scrape time; see :meth:`attach_worklist`.
    """

    def __init__(self, worklist: Worklist | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.instances_received = Counter(
            "triage_instances_received",
            "New DICOM instances stored by the C-STORE handler",
            registry=self.registry,
        )
        self.instances_rejected = Counter(
            "triage_instances_rejected",
            "C-STORE requests refused, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.studies_processed = Counter(
            "triage_studies_processed",
            "Studies finished by a worker, by final status",
            ["status"],
            registry=self.registry,
        )
        self.inference_seconds = Histogram(
            "triage_inference_seconds",
            "Seconds to triage one study (inference, Grad-CAM, output objects)",
            buckets=INFERENCE_BUCKETS,
            registry=self.registry,
        )
        self.deliveries_sent = Counter(
            "triage_deliveries_sent",
            "Result objects sent to a destination",
            registry=self.registry,
        )
        self.deliveries_failed = Counter(
            "triage_deliveries_failed",
            "Failed attempts to send a result object",
            registry=self.registry,
        )
        self._collector: _WorklistCollector | None = None
        if worklist is not None:
            self.attach_worklist(worklist)

    def attach_worklist(self, worklist: Worklist) -> None:
        """Read the DB gauges from ``worklist`` at scrape time (replaces an earlier one)."""
        if self._collector is not None:
            self.registry.unregister(self._collector)  # type: ignore[arg-type]
        self._collector = _WorklistCollector(worklist)
        self.registry.register(self._collector)  # type: ignore[arg-type]

    def attach_receiver(self, associations: Callable[[], float]) -> None:
        """Gauge of the receive path, read at scrape time: open associations."""
        open_associations = Gauge(
            "triage_associations_open",
            "DICOM associations being served",
            registry=self.registry,
        )
        open_associations.set_function(associations)

    @property
    def has_worklist(self) -> bool:
        """Whether DB gauges are collected."""
        return self._collector is not None

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of every metric, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
