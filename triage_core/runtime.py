"""The serving runtime: a checkpoint's ONNX graph run by ONNX Runtime, without torch.

A checkpoint ``NAME`` ships ``NAME.onnx`` beside ``NAME.safetensors`` and ``NAME.json``
(DESIGN.md section 7), written by ``python -m training.export --onnx`` (:mod:`training.onnx_export`)
and checked there against torch. The graph (fp32, opset :data:`OPSET`, dynamic batch) takes the
``(N, 3, S, S)`` input of :func:`triage_core.imaging.to_array` and has two outputs:

``logits``
    ``(N, C)``, before temperature scaling (calibration is :mod:`triage_core.calibration`);
``features``
    ``(N, K, h, w)``, the last convolutional feature map (the Grad-CAM target layer of
    :func:`triage_core.models.cam_target_layers`): the out-of-distribution score pools it, and
    the class activation map weighs it with the classifier's weights.

The graph's metadata (``custom_metadata_map``, keys prefixed ``cxr_triage.``) records what it was
exported from: architecture, task, classes, input size, the SHA-256 of the safetensors tensors, and
the linear head (``head_weight`` ``(C, K)``, ``head_bias``, float32 base64) that the CAM needs.
:class:`OnnxModel` refuses a graph whose metadata disagrees with the spec or whose weights digest
is not the one of the safetensors beside it (a stale export), with a
:class:`~triage_core.errors.SpecMismatchError` naming the field.

Sessions are created once per process and shared (:func:`open_session`): ``run`` is thread-safe in
ONNX Runtime, and a second session would only hold a second copy of the weights and arena.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from triage_core.errors import CheckpointError, SpecMismatchError
from triage_core.spec import CLASS_NAMES, ModelSpec

if TYPE_CHECKING:
    import onnxruntime

    from triage_core.cam import FeatureCam

logger = logging.getLogger(__name__)

#: The two inference runtimes: ONNX Runtime serves, torch trains and evaluates.
RUNTIMES: tuple[str, ...] = ("onnxruntime", "torch")
Runtime = Literal["onnxruntime", "torch"]
#: ONNX opset of the exported graphs.
OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAMES: tuple[str, str] = ("logits", "features")
META_PREFIX = "cxr_triage."
#: Graph optimisation levels (``onnxruntime.GraphOptimizationLevel``) by setting value.
OPTIMIZATION_LEVELS: tuple[str, ...] = ("disable", "basic", "extended", "all")


@dataclass(frozen=True)
class SessionOptions:
    """ONNX Runtime session options that are settings (``NodeSettings`` maps onto these).

    Attributes
    ----------
    threads : int, optional
        Intra-op threads; ``None``: ONNX Runtime's default (one per physical core).
    optimization : str
        One of :data:`OPTIMIZATION_LEVELS` (``all``: every graph rewrite, layout included).
    memory_arena : bool
        Keep freed activation memory for the next call (faster; the arena stays at the largest
        batch's size). Off returns it to the allocator after each call.
    """

    threads: int | None = None
    optimization: str = "all"
    memory_arena: bool = True

    def __post_init__(self) -> None:
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be a positive integer, got {self.threads!r}")
        if self.optimization not in OPTIMIZATION_LEVELS:
            raise ValueError(
                f"unknown optimization {self.optimization!r}; expected one of {OPTIMIZATION_LEVELS}"
            )


def onnx_path(checkpoint: str | Path) -> Path:
    """``NAME.onnx`` for a checkpoint name (a ``.safetensors``/``.json``/``.onnx`` suffix is
    dropped first)."""
    path = Path(checkpoint)
    if path.suffix in (".safetensors", ".json", ".onnx"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".onnx")


def export_command(checkpoint: str | Path) -> str:
    """The command that writes ``NAME.onnx`` for a checkpoint (for error messages)."""
    return f"python -m training.export --onnx --model {Path(checkpoint).with_suffix('')}"


def tensors_sha256(path: Path) -> str:
    """Hex SHA-256 of a safetensors file's tensors (sorted names, dtypes, shapes and values).

    Not of the file's bytes: ``save_checkpoint`` of the same tensors may order the header
    differently, and a re-saved checkpoint with unchanged weights keeps its graph.
    """
    from safetensors import SafetensorError, safe_open

    digest = hashlib.sha256()
    try:
        with safe_open(str(path), framework="numpy") as handle:
            for key in sorted(handle.keys()):  # noqa: SIM118 - safe_open has no __iter__
                tensor = np.ascontiguousarray(handle.get_tensor(key))
                digest.update(f"{key}|{tensor.dtype.str}|{tensor.shape}|".encode())
                digest.update(tensor.tobytes())
    except (OSError, SafetensorError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    return digest.hexdigest()


def encode_array(values: np.ndarray) -> str:
    """float32 little-endian base64 (the graph metadata's array format)."""
    return base64.b64encode(np.ascontiguousarray(values, dtype="<f4").tobytes()).decode("ascii")


def decode_array(text: str, shape: tuple[int, ...], field: str) -> np.ndarray:
    """Inverse of :func:`encode_array`; a wrong size raises ``SpecMismatchError(field)``."""
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise SpecMismatchError(field, f"not base64 ({exc})") from exc
    values = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if values.size != int(np.prod(shape)):
        raise SpecMismatchError(field, f"expected {shape} values, got {values.size}")
    return values.reshape(shape)


def graph_metadata(
    spec: ModelSpec, weights_sha256: str, head: tuple[np.ndarray, np.ndarray]
) -> dict[str, str]:
    """The ``cxr_triage.*`` metadata an export writes (string values)."""
    weight, bias = head
    values = {
        "format": "1",
        "arch": spec.arch,
        "task": spec.task,
        "class_names": json.dumps(list(spec.class_names)),
        "input_size": str(spec.input_size),
        "weights_sha256": weights_sha256,
        "head_weight": encode_array(weight),
        "head_bias": encode_array(bias),
        "feature_channels": str(int(weight.shape[1])),
        "opset": str(OPSET),
    }
    return {META_PREFIX + key: value for key, value in values.items()}


_SESSIONS: dict[tuple[str, int, int, SessionOptions], onnxruntime.InferenceSession] = {}
_SESSIONS_LOCK = threading.Lock()


def create_session(path: Path, options: SessionOptions) -> onnxruntime.InferenceSession:
    """A new ONNX Runtime CPU session for the graph at ``path`` (use :func:`open_session`).

    Raises
    ------
    CheckpointError
        ONNX Runtime is not installed, or the file is missing or not a loadable graph.
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise CheckpointError(
            "the onnxruntime package is not installed (pip install cxr-triage installs it)"
        ) from exc
    if not path.is_file():
        raise CheckpointError(
            f"serving graph {path} does not exist: write it with {export_command(path)} "
            "(or serve with --runtime torch)"
        )
    opts = ort.SessionOptions()
    opts.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[options.optimization]
    if options.threads is not None:
        opts.intra_op_num_threads = options.threads
    opts.inter_op_num_threads = 1
    opts.enable_cpu_mem_arena = options.memory_arena
    opts.log_severity_level = 3  # errors only: ORT's warnings go to stderr, not our log
    try:
        return ort.InferenceSession(
            str(path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        raise CheckpointError(f"{path}: not a loadable ONNX graph ({exc})") from exc


def open_session(path: Path, options: SessionOptions) -> onnxruntime.InferenceSession:
    """The process's session for ``path`` with ``options``: created once, shared after (a file
    rewritten since, e.g. re-exported, gets a new one)."""
    try:
        stat = path.stat()
    except OSError:
        return create_session(path, options)  # raises the missing-file error
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, options)
    with _SESSIONS_LOCK:
        session = _SESSIONS.get(key)
        if session is None:
            session = _SESSIONS[key] = create_session(path, options)
        return session


def _meta(meta: dict[str, str], name: str, path: Path) -> str:
    key = META_PREFIX + name
    if key not in meta:
        raise SpecMismatchError(
            name, f"{path} has no {key} metadata: not exported by {export_command(path)}"
        )
    return meta[key]


class OnnxModel:
    """A checkpoint's serving graph in ONNX Runtime, validated against its spec and weights.

    Parameters
    ----------
    checkpoint : Path
        Checkpoint name ``NAME`` (``NAME.onnx`` is loaded; ``NAME.safetensors`` is hashed).
    spec : ModelSpec
        The checkpoint's spec (``NAME.json``).
    options : SessionOptions
        Session settings.

    Raises
    ------
    CheckpointError, SpecMismatchError
        Missing graph, or metadata that disagrees with the spec or the weights.
    """

    #: What :class:`~triage_core.inference.Predictor` reports for this runtime.
    runtime = "onnxruntime"
    mode = "onnxruntime"
    device = "cpu"

    def __init__(self, checkpoint: Path, spec: ModelSpec, options: SessionOptions) -> None:
        self.path = onnx_path(checkpoint)
        self.spec = spec
        self.options = options
        self.session = open_session(self.path, options)
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        self.metadata = meta
        self._check(meta, checkpoint)
        channels = int(_meta(meta, "feature_channels", self.path))
        self.head_weight = decode_array(
            _meta(meta, "head_weight", self.path), (spec.num_classes, channels), "head_weight"
        )
        self.head_bias = decode_array(
            _meta(meta, "head_bias", self.path), (spec.num_classes,), "head_bias"
        )
        inputs = self.session.get_inputs()
        outputs = [o.name for o in self.session.get_outputs()]
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME or tuple(outputs) != OUTPUT_NAMES:
            raise SpecMismatchError(
                "onnx", f"{self.path}: expected input {INPUT_NAME!r} and outputs {OUTPUT_NAMES}"
            )

    @classmethod
    def load(
        cls, checkpoint: Path, session: SessionOptions | None = None, threads: int | None = None
    ) -> OnnxModel:
        """The serving graph of checkpoint ``NAME``, with the spec read from ``NAME.json``.

        Parameters
        ----------
        checkpoint : Path
            Checkpoint name.
        session : SessionOptions, optional
            Session settings (default: :class:`SessionOptions` defaults).
        threads : int, optional
            Intra-op threads when ``session`` leaves them unset.

        Raises
        ------
        CheckpointError, SpecMismatchError
            Missing or invalid checkpoint, classes other than :data:`~triage_core.spec.CLASS_NAMES`
            (as ``models.load_checkpoint`` refuses them), or a stale graph.
        """
        from triage_core import models

        spec = models.read_spec(checkpoint)
        if spec.class_names != CLASS_NAMES:
            raise SpecMismatchError(
                "class_names", f"checkpoint has {list(spec.class_names)}, expected {CLASS_NAMES}"
            )
        options = session or SessionOptions()
        if options.threads is None and threads is not None:
            options = replace(options, threads=threads)
        model = cls(checkpoint, spec, options)
        logger.info("loaded model %s from %s (ONNX Runtime)", spec.display_name, model.path)
        return model

    def _check(self, meta: dict[str, str], checkpoint: Path) -> None:
        spec, path = self.spec, self.path
        expected = {
            "arch": spec.arch,
            "task": spec.task,
            "input_size": str(spec.input_size),
            "class_names": json.dumps(list(spec.class_names)),
        }
        for name, value in expected.items():
            found = _meta(meta, name, path)
            if found != value:
                field = "class_names" if name == "class_names" else name
                raise SpecMismatchError(
                    field, f"{path} was exported with {found}, spec has {value}"
                )
        weights = Path(checkpoint).with_suffix("") if Path(checkpoint).suffix else Path(checkpoint)
        weights = weights.with_name(weights.name + ".safetensors")
        if weights.is_file():
            digest = tensors_sha256(weights)
            if _meta(meta, "weights_sha256", path) != digest:
                raise SpecMismatchError(
                    "weights_sha256",
                    f"{path} was exported from other weights than {weights.name}: re-export "
                    f"it with {export_command(checkpoint)}",
                )

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(logits (N, C), features (N, K, h, w))`` float32 for a ``(N, 3, S, S)`` batch."""
        x = np.ascontiguousarray(batch, dtype=np.float32)
        logits, features = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
        return np.asarray(logits, dtype=np.float32), np.asarray(features, dtype=np.float32)

    def forward(self, batch: np.ndarray, with_features: bool) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`run` (the features come from the same pass whether asked for or not)."""
        return self.run(batch)

    def ood_features(self, batch: np.ndarray) -> np.ndarray:
        """The feature map ``(N, K, h, w)`` for the out-of-distribution score."""
        return self.run(batch)[1]

    def explainer(self, features_of: Callable[[np.ndarray], np.ndarray | None]) -> FeatureCam:
        """Class activation maps from the feature map and the head weights of the metadata
        (numpy only); ``features_of`` runs the graph for an image whose features were not
        kept."""
        from triage_core.cam import FeatureCam

        return FeatureCam(self.spec, self.head_weight, features_of)

    def describe(self) -> dict[str, Any]:
        """Identity for logs."""
        import onnxruntime as ort

        return {
            "graph": str(self.path),
            "onnxruntime": ort.__version__,
            "threads": self.options.threads,
            "optimization": self.options.optimization,
        }
