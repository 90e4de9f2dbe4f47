"""A checkpoint's serving graph: ``NAME.onnx`` beside ``NAME.safetensors``, checked against torch.

``python -m training.export --onnx --model NAME --check-images DIR...`` (and every ``triage
train``, on its validation images) calls :func:`export_onnx`:

1. the checkpoint is loaded in fp32 (an fp16 file is widened, as the torch runtime does);
2. a wrapper that returns ``(logits, features)`` (features: the Grad-CAM target layer of
   :func:`triage_core.models.cam_target_layers`, i.e. the last feature map) is exported with
   ``torch.onnx.export`` (TorchScript exporter, ``dynamo=False``: one self-contained file in
   about two seconds; opset :data:`triage_core.runtime.OPSET`, fp32, the batch axis dynamic);
3. the graph metadata records the spec's identity, the SHA-256 of the safetensors tensors and the
   linear head for the class activation map (:func:`triage_core.runtime.graph_metadata`);
4. the self-check: on the check images (through :func:`triage_core.imaging.to_array`), ONNX
   Runtime against the torch fp32 model (eager): the largest calibrated-probability difference
   must be <= ``prob_tolerance`` (1e-4), every class's CAM map from the graph's features within
   ``cam_tolerance`` (1e-3) of ``pytorch_grad_cam``'s Grad-CAM of the torch model (on the first
   :data:`CAM_CHECK_IMAGES` images), and no
   present/absent decision may flip at the spec's thresholds. A graph that fails is deleted and
   :class:`OnnxExportError` raised; one that passes is renamed into place, its check recorded
   in its metadata (``cxr_triage.check``).
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from triage_core.errors import TriageError

if TYPE_CHECKING:
    import torch

    from triage_core.spec import ModelSpec

logger = logging.getLogger(__name__)

#: Defaults of the self-check (issue 15).
PROB_TOLERANCE = 1e-4
CAM_TOLERANCE = 1e-3
#: Images used by the check at most, and of those, images whose CAM maps are compared (each
#: class's ``pytorch_grad_cam`` pass costs about a second on a loaded 2-core machine).
MAX_CHECK_IMAGES = 32
CAM_CHECK_IMAGES = 8


class OnnxExportError(TriageError):
    """The exported graph disagrees with torch beyond the tolerances (nothing was written)."""


def serving_wrapper(model: torch.nn.Module, arch: str) -> torch.nn.Module:
    """A module whose ``forward(x)`` returns ``(logits, last feature map)``."""
    import torch

    class ServingGraph(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            inner: Any = self.inner
            if arch == "resnet18":  # torchvision: features after layer4, head avgpool + fc
                f = inner.maxpool(inner.relu(inner.bn1(inner.conv1(x))))
                f = inner.layer4(inner.layer3(inner.layer2(inner.layer1(f))))
                return inner.fc(torch.flatten(inner.avgpool(f), 1)), f
            f = inner.forward_features(x)  # timm EfficientNet: up to bn2 (conv_head + BN + act)
            return inner.forward_head(f), f

    return ServingGraph(model).eval()


def linear_head(model: torch.nn.Module, arch: str) -> tuple[np.ndarray, np.ndarray]:
    """``(weight (C, K), bias (C,))`` of the classifier that follows global average pooling."""
    core: Any = getattr(model, "module", model)
    layer = core.fc if arch == "resnet18" else core.classifier
    weight = layer.weight.detach().float().cpu().numpy()
    bias = layer.bias.detach().float().cpu().numpy()
    return np.ascontiguousarray(weight), np.ascontiguousarray(bias)


def check_inputs(
    paths: Sequence[Path], spec: ModelSpec, limit: int = MAX_CHECK_IMAGES
) -> np.ndarray:
    """``(N, 3, S, S)`` inputs from image files or folders (sorted, recursive; unreadable files
    skipped), at most ``limit``."""
    from triage_core.errors import ImageReadError
    from triage_core.imaging import load_image, to_array

    files: list[Path] = []
    for path in paths:
        files.extend(sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])
    arrays: list[np.ndarray] = []
    for path in files:
        if len(arrays) >= limit:
            break
        if path.suffix.lower() not in (".dcm", ".png", ".jpg", ".jpeg", ""):
            continue
        try:
            arrays.append(to_array(load_image(path), spec))
        except (ImageReadError, ValueError) as exc:
            logger.info("check image %s skipped: %s", path.name, exc)
    if not arrays:
        raise OnnxExportError(f"no readable check image in {', '.join(str(p) for p in paths)}")
    return np.stack(arrays)


def _write_graph(model: torch.nn.Module, spec: ModelSpec, target: Path) -> None:
    import torch

    from triage_core.runtime import INPUT_NAME, OPSET, OUTPUT_NAMES

    wrapper = serving_wrapper(model, spec.arch)
    example = torch.zeros(2, 3, spec.input_size, spec.input_size)
    axes = {name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            wrapper,
            (example,),
            str(target),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def _set_metadata(target: Path, values: dict[str, str]) -> None:
    import onnx

    graph = onnx.load(str(target))
    kept = [p for p in graph.metadata_props if p.key not in values]
    del graph.metadata_props[:]
    graph.metadata_props.extend(kept)
    for key, value in values.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(target))


def self_check(
    model: torch.nn.Module,
    spec: ModelSpec,
    graph: Path,
    inputs: np.ndarray,
    head_weight: np.ndarray,
) -> dict[str, Any]:
    """ONNX Runtime (``graph``) against the torch fp32 ``model`` on ``inputs``; the numbers."""
    from triage_core.cam import CamExplainer, class_activation_map
    from triage_core.inference import Predictor, calibrate
    from triage_core.runtime import SessionOptions, create_session

    session = create_session(graph, SessionOptions())
    ort_logits, ort_features = session.run(None, {"input": inputs.astype(np.float32)})
    reference = Predictor(model=model, spec=spec, mode="eager", batch_size=16)
    torch_probs, torch_features = reference.predict_with_features(inputs)
    ort_probs = calibrate(np.asarray(ort_logits), spec)
    thresholds = np.asarray(spec.thresholds, dtype=np.float32)
    flips = int(((ort_probs >= thresholds) != (torch_probs >= thresholds)).sum())
    explainer = CamExplainer(model, spec)
    cam_diff = 0.0
    for i in range(min(inputs.shape[0], CAM_CHECK_IMAGES)):
        for k in range(spec.num_classes):
            ours = class_activation_map(ort_features[i], head_weight[k], spec.input_size)
            gradcam = explainer.square_map(inputs[i], k)
            cam_diff = max(cam_diff, float(np.abs(ours - gradcam).max()))
    feature_diff = (
        float(np.abs(np.asarray(ort_features) - torch_features).max())
        if torch_features is not None
        else None
    )
    return {
        "images": int(inputs.shape[0]),
        "cam_images": min(int(inputs.shape[0]), CAM_CHECK_IMAGES),
        "max_abs_probability_difference": float(np.abs(ort_probs - torch_probs).max()),
        "max_abs_feature_difference": feature_diff,
        "max_abs_cam_difference": cam_diff,
        "decision_flips": flips,
        "decisions": int(ort_probs.size),
    }


def export_onnx(
    checkpoint: Path,
    inputs: np.ndarray,
    *,
    prob_tolerance: float = PROB_TOLERANCE,
    cam_tolerance: float = CAM_TOLERANCE,
) -> dict[str, Any]:
    """Write ``checkpoint``'s serving graph ``NAME.onnx`` after checking it (module docstring).

    Parameters
    ----------
    checkpoint : Path
        Checkpoint name ``NAME`` (``NAME.safetensors`` + ``NAME.json``).
    inputs : numpy.ndarray
        ``(N, 3, S, S)`` check inputs (:func:`check_inputs`, or a training split's tensors).
    prob_tolerance, cam_tolerance : float
        Largest allowed probability and CAM differences.

    Returns
    -------
    dict
        The check's numbers, the graph path, opset and export seconds.

    Raises
    ------
    OnnxExportError
        The check failed (no file written) or the inputs do not fit the spec.
    """
    import onnxruntime
    import torch

    from triage_core.models import checkpoint_paths, load_checkpoint
    from triage_core.runtime import OPSET, graph_metadata, onnx_path, tensors_sha256

    started = time.perf_counter()
    model, spec = load_checkpoint(checkpoint, expected_class_names=None)
    size = spec.input_size
    inputs = np.asarray(inputs, dtype=np.float32)
    if inputs.ndim != 4 or inputs.shape[1:] != (3, size, size) or inputs.shape[0] == 0:
        raise OnnxExportError(f"check inputs of shape {inputs.shape} do not fit {size} px")
    head = linear_head(model, spec.arch)
    weights, _ = checkpoint_paths(checkpoint)
    target = onnx_path(checkpoint)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        _write_graph(model, spec, tmp)
        _set_metadata(tmp, graph_metadata(spec, tensors_sha256(weights), head))
        check = self_check(model, spec, tmp, inputs, head[0])
        check.update(
            prob_tolerance=prob_tolerance,
            cam_tolerance=cam_tolerance,
            opset=OPSET,
            torch=torch.__version__,
            onnxruntime=onnxruntime.__version__,
        )
        failed = (
            check["max_abs_probability_difference"] > prob_tolerance
            or check["max_abs_cam_difference"] > cam_tolerance
            or check["decision_flips"] > 0
        )
        if failed:
            raise OnnxExportError(f"the ONNX graph disagrees with torch, not written: {check}")
        _set_metadata(tmp, {"cxr_triage.check": json.dumps(check, sort_keys=True)})
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    check["graph"] = str(target)
    check["seconds"] = round(time.perf_counter() - started, 1)
    logger.info("wrote %s (%s)", target, json.dumps(check))
    return check


def export_after_training(checkpoint: Path, tensors: torch.Tensor) -> dict[str, Any] | None:
    """``triage train``'s hook: the serving graph of the checkpoint just saved, checked on the
    first validation tensors. A failed check is reported, not raised: the checkpoint stays usable
    with ``--runtime torch``, and ``python -m training.export --onnx`` can retry."""
    try:
        inputs = tensors[:MAX_CHECK_IMAGES].float().cpu().numpy()
        return export_onnx(checkpoint, inputs)
    except TriageError as exc:
        logger.error("no ONNX graph for %s: %s", checkpoint, exc)
        print(f"no ONNX serving graph written for {checkpoint}: {exc}", flush=True)
        return None
