"""From per-image results to study-level findings.

A study is positive for a finding when any of its eligible images is: :func:`aggregate_study`
takes, per class, the maximum calibrated probability over the usable images and compares it
with the checkpoint's operating threshold. Each finding remembers the image that gave it, so the
class activation map can be drawn on that image (:mod:`triage_core.pipeline`) and the SR can
reference it.
"""

from __future__ import annotations

from collections.abc import Sequence

from triage_core.spec import Finding, ImageResult, ModelSpec

__all__ = ["aggregate_study"]


def aggregate_study(images: Sequence[ImageResult], spec: ModelSpec) -> tuple[Finding, ...]:
    """Study-level findings: per class, the maximum probability over the eligible images.

    Parameters
    ----------
    images : sequence of ImageResult
        Per-image results; images that are not eligible, carry an ``error`` or have no
        probabilities are ignored.
    spec : ModelSpec
        Class names and per-class operating thresholds.

    Returns
    -------
    tuple of Finding
        One finding per class, in ``spec.class_names`` order, each remembering the image
        (``source_uid``) that gave its probability (the first such image on ties); empty when
        no image was usable.

    Raises
    ------
    ValueError
        A usable image has no probability for one of the classes.
    """
    usable = [im for im in images if im.eligible and not im.error and im.probabilities]
    if not usable:
        return ()
    findings = []
    for name, threshold in zip(spec.class_names, spec.thresholds, strict=True):
        best: ImageResult | None = None
        best_p = -1.0
        for image in usable:
            if name not in image.probabilities:
                raise ValueError(f"image {image.uid} has no probability for {name!r}")
            p = float(image.probabilities[name])
            if p > best_p:
                best, best_p = image, p
        assert best is not None
        findings.append(
            Finding(
                name=name,
                probability=best_p,
                threshold=float(threshold),
                present=best_p >= float(threshold),
                source_uid=best.uid,
            )
        )
    return tuple(findings)
