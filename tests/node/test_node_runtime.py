"""The serving runtime through the whole node: torch made unimportable, the same results from
ONNX Runtime and torch (Predictor, SR, SC, worklist, API), and a whole ``triage serve`` over TLS
with DCMTK on both sides (``storescu +tls`` in, ``storescp +tls`` as the destination).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest
from test_node_support import (
    DCIODVFY,
    ECHOSCU,
    STORESCU,
    STORESCU_TS_FLAG,
    ServeProcess,
    dcmtk_env,
    free_port,
    needs_dcmtk,
    transfer_syntax,
)
from test_node_tls import Pki, _tls_storescp, pki  # noqa: F401 - pki is a fixture

#: Imported by this sitecustomize, every name here fails as a missing package would.
_BLOCKER = """
import sys

BLOCKED = {"torch", "torchvision", "timm", "pytorch_grad_cam", "sklearn", "matplotlib"}


class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None


sys.meta_path.insert(0, _NoTorch())
"""

CHEST = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"


@pytest.fixture(scope="module")
def torchless_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("torchless")
    (folder / "sitecustomize.py").write_text(_BLOCKER)
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}


def _python(env: dict[str, str], code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


def test_the_serving_path_imports_without_torch(torchless_env: dict[str, str]) -> None:
    blocked = _python(torchless_env, "import torch")
    assert blocked.returncode != 0 and "blocked" in blocked.stderr
    modules = (
        "triage_core, triage_core.inference, triage_core.cam, triage_core.pipeline, "
        "triage_core.runtime, triage_core.models, dicom_node.cli, dicom_node.commands.serve, "
        "dicom_node.node, dicom_node.stages.process, dicom_node.web.api, dicom_node.web.server, "
        "dicom_node.stages.outputs"
    )
    proc = _python(torchless_env, f"import {modules}; import sys; print('torch' in sys.modules)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_triage_predict_runs_without_torch(
    torchless_env: dict[str, str], dicom_dir: Path, tmp_path: Path
) -> None:
    cam_dir = tmp_path / "cams"
    proc = subprocess.run(
        [sys.executable, "-m", "dicom_node", "predict", str(dicom_dir / CHEST), "--cam-dir",
         str(cam_dir)],
        env=torchless_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.splitlines()[0])
    assert record["eligible"] and set(record["probabilities"]) == {
        "Atelectasis",
        "Effusion",
        "Infiltration",
    }
    assert all(0.0 <= p <= 1.0 for p in record["probabilities"].values())
    assert Path(record["cam"]).is_file()
    torch_run = subprocess.run(
        [sys.executable, "-m", "dicom_node", "predict", "--runtime", "torch",
         str(dicom_dir / CHEST)],
        env=torchless_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert torch_run.returncode != 0  # --runtime torch does need torch
    assert "pip install 'cxr-triage[train]'" in torch_run.stderr
    assert "Traceback" not in torch_run.stderr


def _process_with(runtime: str, checkpoint: Path, study: list[Path], storage: Path) -> dict:  # type: ignore[type-arg]
    """One study through a worker pass with ``runtime``: the worklist row, the API's JSON, the
    SR's findings, the SC's pixels and the PM's map."""
    from fastapi.testclient import TestClient

    from dicom_node.node import open_worklist
    from dicom_node.settings import load_settings
    from dicom_node.stages.process import Processing
    from dicom_node.stages.wakeup import Wakeups
    from dicom_node.web.api import create_app
    from triage_core.dicom_out import findings_from_sr, heatmap_from_pm
    from triage_core.inference import Predictor

    settings = load_settings(None, {"storage": storage, "workers": 0, "sc_max_side": 0})
    worklist = open_worklist(settings)
    for path in study:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        worklist.ingest.record_instance(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), path)
    worklist.queue.queue_stable_studies(0.0)
    claimed = worklist.queue.claim_study("w", 60)
    assert claimed is not None
    processing = Processing(
        settings,
        worklist,
        Wakeups(worklist, shared=False, poll=0.2),
        "node",
        predictor=Predictor(checkpoint, runtime=runtime, mode="eager"),
    )
    outcome = processing.process_claimed(claimed)
    assert outcome.status == "done"
    sr_path, sc_path, pm_path = outcome.outputs
    for path in (sr_path, sc_path, pm_path):
        check = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stderr
    detail = worklist.queries.study_detail(claimed.study_uid)
    api = TestClient(create_app(worklist)).get(f"/api/studies/{claimed.study_uid}").json()
    worklist.dispose()
    return {
        "detail": detail,
        "api": api,
        "sr": findings_from_sr(pydicom.dcmread(sr_path)),
        "sc": pydicom.dcmread(sc_path).pixel_array,
        "pm": heatmap_from_pm(pydicom.dcmread(pm_path)),
    }


@needs_dcmtk
def test_both_runtimes_give_the_same_results(
    tiny_checkpoint: Path, dicom_dir: Path, tmp_path: Path
) -> None:
    study = [dicom_dir / CHEST]
    ort = _process_with("onnxruntime", tiny_checkpoint, study, tmp_path / "ort")
    ref = _process_with("torch", tiny_checkpoint, study, tmp_path / "torch")
    for key in ("detail", "api"):
        a, b = ort[key], ref[key]
        assert a["priority_level"] == b["priority_level"]
        assert a["priority_score"] == pytest.approx(b["priority_score"], abs=0.05)
        assert set(a["findings"]) == set(b["findings"])
        for name, finding in a["findings"].items():
            assert finding["present"] == b["findings"][name]["present"]
            assert finding["probability"] == pytest.approx(
                b["findings"][name]["probability"], abs=1e-4
            )
    assert set(ort["sr"]) == set(ref["sr"])
    for name, (probability, present) in ort["sr"].items():
        assert present == ref["sr"][name][1]
        assert probability == pytest.approx(ref["sr"][name][0], abs=1e-4)
    assert ort["sc"].shape == ref["sc"].shape
    # CAM maps within 1e-3: the overlay's 8-bit colours may differ by a step or two
    diff = np.abs(ort["sc"].astype(int) - ref["sc"].astype(int))
    assert diff.max() <= 3 and diff.mean() < 0.05
    # the Parametric Map holds the map itself: the two runtimes' maps within 1e-3
    assert ort["pm"].shape == ref["pm"].shape
    assert np.abs(ort["pm"] - ref["pm"]).max() <= 1e-3


def _tls_echo(port: int, pki: Pki) -> bool:  # noqa: F811 - the Pki class, not the fixture
    key, cert = pki.client
    proc = subprocess.run(
        [ECHOSCU, "-aec", "CXR_TRIAGE", "-to", "5", "+tls", str(key), str(cert), "+cf",
         str(pki.ca), "127.0.0.1", str(port)],
        capture_output=True, timeout=30, env=dcmtk_env(), check=False,
    )  # fmt: skip
    return proc.returncode == 0


@needs_dcmtk
def test_serve_over_tls_without_torch_delivers_sr_sc_and_pm(
    pki: Pki,  # noqa: F811
    torchless_env: dict[str, str],
    dicom_dir: Path,
    tmp_path: Path,
) -> None:
    """The whole node with torch unimportable: storescu +tls in, SR and SC to storescp +tls."""
    port, http_port, dest_port = free_port(), free_port(), free_port()
    key, cert = pki.server
    client_key, client_cert = pki.client
    config = tmp_path / "triage.toml"
    config.write_text(
        f'stable_age = 0.5\n[[destinations]]\nae_title = "PACS"\nhost = "127.0.0.1"\n'
        f'port = {dest_port}\ntls_ca = "{pki.ca}"\ntls_cert = "{client_cert}"\n'
        f'tls_key = "{client_key}"\n'
    )
    args = [
        "serve", "--config", str(config), "--storage", str(tmp_path / "storage"),
        "--port", str(port), "--http-port", str(http_port), "--tls-cert", str(cert),
        "--tls-key", str(key), "--tls-ca", str(pki.ca),
    ]  # fmt: skip
    with _tls_storescp(tmp_path / "out", dest_port, pki.server, pki.ca) as out:
        node = ServeProcess(args, tmp_path / "serve.log", torchless_env).start()
        try:
            deadline = time.monotonic() + 300  # generous: CI machines are shared
            while not _tls_echo(port, pki):
                assert node.proc is not None and node.proc.poll() is None, node.log()
                assert time.monotonic() < deadline, node.log()
                time.sleep(0.2)
            live = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz/live", timeout=10)
            assert json.load(live) == {"status": "live"}
            chest = dicom_dir / CHEST
            proc = subprocess.run(
                [STORESCU, "-aec", "CXR_TRIAGE", STORESCU_TS_FLAG[transfer_syntax(chest)],
                 "+tls", str(client_key), str(client_cert), "+cf", str(pki.ca), "127.0.0.1",
                 str(port), str(chest)],
                capture_output=True, text=True, timeout=60, env=dcmtk_env(),
            )  # fmt: skip
            assert proc.returncode == 0, proc.stderr
            while len(list(out.iterdir())) < 3:  # SR, SC, PM
                assert time.monotonic() < deadline + 300, node.log()
                time.sleep(0.2)
            ready = urllib.request.urlopen(
                f"http://127.0.0.1:{http_port}/healthz/ready", timeout=10
            )
            assert json.load(ready)["model"] == "ready"
        finally:
            returncode = node.stop()
    assert returncode == 0, node.log()
    received = [pydicom.dcmread(p) for p in sorted(out.iterdir())]
    assert sorted(ds.Modality == "SR" for ds in received) == [False, False, True]
    classes = {ds.SOPClassUID for ds in received}
    assert {pydicom.uid.SecondaryCaptureImageStorage, pydicom.uid.ParametricMapStorage} <= classes
    for path in out.iterdir():
        check = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stderr
    log = node.log()
    assert "runtime onnxruntime" in log and "Traceback" not in log


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tls-cert", "x.pem"], "tls_cert and tls_key go together"),
        (["--tls-ca", "ca.pem"], "tls_ca (client authentication) needs tls_cert"),
        (["--tls-cert", "nowhere.pem", "--tls-key", "nowhere.key"], "nowhere.pem"),
        (["--http-host", "0.0.0.0"], "is not a loopback address"),
        (["--artim-timeout", "0"], "artim_timeout"),
        (["--max-pdu-size", "10"], "max_pdu_size"),
        (["--runtime", "torch", "--port", "70000"], "port"),
    ],
)
def test_network_flags_are_validated_like_the_toml_file(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every network setting of the TOML file is a flag too, with the same checks and one
    line on stderr (exit status 2), before anything starts."""
    from dicom_node import cli

    argv = ["serve", "--storage", str(tmp_path / "s"), "--port", str(free_port()), *flags]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
