"""The real OHIF viewer against a real ``triage serve``, in headless Chromium (Selenium).

OHIF is installed from npm the way ``triage viewer install`` does it (test_viewer_support.py:
once per run, skipped with npm's reason without npm or the registry). A ``triage serve`` with the
random-weight ``tiny_checkpoint`` (plumbing: the scores mean nothing) receives a shared small
8-bit chest DICOM by C-STORE (DCMTK ``dcmsend``), makes its SR and Grad-CAM SC, and the test
opens the study from the worklist page's "Open in viewer" link. It asserts that the CR viewport
draws the image (pixel variance of its canvas far above an empty canvas's 0), that the SC and
SR series are listed, that the SR's findings are shown, and that no request of the viewer to
our server answered 4xx/5xx and none went to another host (DevTools performance log).

Chromium flags as ENVIRONMENT.md says: OHIF needs WebGL, which headless Chromium has here only
through SwiftShader; 16-bit 2k images stay black there, 8-bit ones draw.
``CXR_TRIAGE_SCREENSHOTS=docs/img CXR_TRIAGE_WEB_MODEL=default`` saves the screenshots there,
made with the shipped model; the requests (path, Accept header, our status codes) are printed
and written to the test's ``viewer_requests.json``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pydicom
import pytest
from test_node_e2e import Node, http_json, wait_for
from test_node_support import free_port, needs_dcmtk, storescp_destination
from test_viewer_support import copy_viewer, ohif_storage, ohif_tarball

from dicom_node.web.viewer import viewer_url
from triage_core.dicom_out.common import SC_SERIES_DESCRIPTION, SR_SERIES_DESCRIPTION

__all__ = ["ohif_storage", "ohif_tarball"]  # fixtures used here

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
DCMSEND = "/usr/bin/dcmsend"
#: A shared 8-bit 1024 x 1024 CR chest (JPEG baseline): small and 8-bit, so SwiftShader draws it.
CHEST = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"

pytestmark = [
    needs_dcmtk,
    pytest.mark.skipif(
        not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
        reason="Debian chromium and chromium-driver are not installed (make system-deps)",
    ),
]

#: Pixel variance (grey levels squared) of the CR canvas: an empty canvas has 0.
MIN_VARIANCE = 100.0

#: Share of sampled pixels of the SC canvas whose red and blue differ (the heatmap's colours;
#: 0 on a grey image).
MIN_COLOUR_SHARE = 0.01

CANVAS_COLOUR = """
const c = document.querySelector('canvas.cornerstone-canvas');
if (!c || !c.width) return 0;
const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
let n = 0, coloured = 0;
for (let i = 0; i < d.length; i += 4 * 5) { n++; if (Math.abs(d[i] - d[i + 2]) > 40) coloured++; }
return coloured / n;
"""

CANVAS_VARIANCE = """
const canvases = Array.from(document.querySelectorAll('canvas.cornerstone-canvas'));
return canvases.map(c => {
  if (!c.width || !c.height) return -1;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0, s = 0, s2 = 0;
  for (let i = 0; i < d.length; i += 4 * 3) {
    const g = (d[i] + d[i + 1] + d[i + 2]) / 3; n++; s += g; s2 += g * g;
  }
  const m = s / n; return s2 / n - m * m;
});
"""


def chrome(profile: Path) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not look for a browser to fetch
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--use-angle=swiftshader",
        "--enable-unsafe-swiftshader",
        "--ignore-gpu-blocklist",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1600,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(120)
    driver.set_script_timeout(60)
    return driver


class Requests:
    """Every request the browser made and its answer, from the DevTools performance log."""

    def __init__(self) -> None:
        self.by_id: dict[str, dict[str, Any]] = {}

    def read(self, driver: Any) -> None:
        for entry in driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            method, params = message.get("method", ""), message.get("params", {})
            rid = params.get("requestId")
            if method == "Network.requestWillBeSent":
                req = params["request"]
                accept = {k.lower(): v for k, v in req.get("headers", {}).items()}.get("accept", "")
                self.by_id.setdefault(rid, {}).update(
                    url=req["url"], method=req["method"], accept=accept
                )
            elif method == "Network.responseReceived":
                rsp = params["response"]
                self.by_id.setdefault(rid, {}).update(
                    url=rsp["url"], status=rsp["status"], type=rsp.get("mimeType", "")
                )
            elif method == "Network.loadingFailed":
                self.by_id.setdefault(rid, {}).update(
                    failed=params.get("errorText", ""),
                    blocked=params.get("blockedReason", ""),
                    canceled=params.get("canceled", False),
                )

    def network(self) -> list[dict[str, Any]]:
        return [
            r
            for r in self.by_id.values()
            if urlsplit(r.get("url", "")).scheme in ("http", "https", "ws", "wss")
        ]


def screenshot(driver: Any, folder: Path, name: str) -> Path:
    path = folder / name
    assert driver.save_screenshot(str(path)), f"no screenshot {path}"
    assert path.stat().st_size > 10_000
    return path


def dismiss_notice(driver: Any) -> None:
    """OHIF's investigational-use notice (shown once, then every 30 days by our config)."""
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.CSS_SELECTOR, '[data-cy="confirm-and-hide-button"]'):
        if button.is_displayed():
            button.click()


def skip_tour(driver: Any) -> None:
    """OHIF's onboarding tour (shown once per browser profile)."""
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.XPATH, '//button[normalize-space()="Skip all"]'):
        if button.is_displayed():
            button.click()


def variances(driver: Any) -> list[float]:
    return [float(v) for v in driver.execute_script(CANVAS_VARIANCE)]


def wait_drawn(driver: Any, timeout: float = 60) -> list[float]:
    """Wait until a viewport canvas shows an image (variance above :data:`MIN_VARIANCE`)."""
    from selenium.webdriver.support.ui import WebDriverWait

    def drawn(d: Any) -> list[float] | None:
        dismiss_notice(d)
        found = variances(d)
        return found if found and max(found) > MIN_VARIANCE else None

    result: list[float] = WebDriverWait(driver, timeout, poll_frequency=0.5).until(drawn)
    return result


def open_series(driver: Any, modality: str) -> None:
    """Double-click the study browser's entry of the first series of ``modality``."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    entry = driver.find_element(
        By.XPATH,
        f'//*[@data-cy="series-modality-label" and normalize-space()="{modality}"]'
        '/ancestor::*[@role="button"][1]',
    )
    ActionChains(driver).double_click(entry).perform()


def resource(path: str) -> str:
    """A request path with its UIDs named, for the list of what OHIF asked for."""
    path = re.sub(r"/studies/[0-9.]+", "/studies/{study}", path)
    path = re.sub(r"/series/[0-9.]+", "/series/{series}", path)
    path = re.sub(r"/instances/[0-9.]+", "/instances/{instance}", path)
    path = re.sub(r"/frames/[0-9,]+", "/frames/{n}", path)
    if path.startswith("/viewer/") and not path.startswith("/viewer/viewer"):
        path = "/viewer/{file}" + (path[path.rfind(".") :] if "." in path else "")
    return path


def check_requests(requests: Requests, base: str, out: Path) -> dict[str, list[int]]:
    """Every request went to our server and none answered 4xx/5xx; the list goes to ``out``."""
    host = urlsplit(base).netloc
    network = requests.network()
    remote = [r["url"] for r in network if urlsplit(r["url"]).netloc != host]
    assert not remote, f"the viewer asked another host: {remote}"
    seen: dict[str, list[int]] = {}
    for r in network:
        url = urlsplit(r["url"])
        key = f"{r.get('method', 'GET')} {resource(url.path)}"
        if url.path.startswith("/dicomweb/"):
            key += f" (Accept: {r.get('accept', '')})"
        seen.setdefault(key, [])
        if "status" in r and r["status"] not in seen[key]:
            seen[key].append(r["status"])
    out.write_text(json.dumps(dict(sorted(seen.items())), indent=1) + "\n")
    bad = [r for r in network if r.get("status", 0) >= 400]
    assert not bad, f"requests answered 4xx/5xx: {bad}"
    failed = [r for r in network if r.get("failed") and not r.get("canceled")]
    assert not failed, f"requests failed: {failed}"
    return seen


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_checkpoint: Path,
    ohif_storage: Path,
    dicom_dir: Path,
) -> Iterator[tuple[Node, str]]:
    """A node with the viewer, our shared chest sent and processed: (node, study UID).

    The random model's thresholds are lowered to 0.001 so that every finding is judged present
    (and gets an image region where the SR writer makes them); ``CXR_TRIAGE_WEB_MODEL=default``
    takes the shipped model as it is instead (for the screenshots).
    """
    tmp = tmp_path_factory.mktemp("ohif-node")
    if os.environ.get("CXR_TRIAGE_WEB_MODEL") == "default":  # the screenshots of docs/img
        from triage_core.models import default_checkpoint_path

        model = default_checkpoint_path()
    else:
        model = tmp / "model" / "tiny"
        model.parent.mkdir()
        for suffix in (".safetensors", ".onnx"):
            shutil.copyfile(tiny_checkpoint.with_suffix(suffix), model.with_suffix(suffix))
        spec = json.loads(tiny_checkpoint.with_suffix(".json").read_text())
        spec["thresholds"] = [0.001] * len(spec["class_names"])
        model.with_suffix(".json").write_text(json.dumps(spec))
    dest = free_port()
    node = Node(tmp, model, dest)
    copy_viewer(ohif_storage, node.storage)
    chest = dicom_dir / CHEST
    study_uid = str(pydicom.dcmread(chest, stop_before_pixels=True).StudyInstanceUID)
    with storescp_destination(tmp / "pacs", dest):
        node.start()
        try:
            proc = subprocess.run(
                [DCMSEND, "-aet", "OHIFTEST", "-aec", "CXR_TRIAGE", "127.0.0.1"]
                + [str(node.port), str(chest)],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert proc.returncode == 0, proc.stdout + proc.stderr
            row = wait_for(lambda: node.finished(study_uid), 120, "the study", node.proc.log)
            assert row["status"] == "done", row
            yield node, study_uid
        finally:
            node.proc.stop()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("CXR_TRIAGE_SCREENSHOTS") or tmp_path / "shots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_ohif_opens_our_study_from_the_worklist(
    served: tuple[Node, str], tmp_path: Path, shots: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    node, study_uid = served
    series = http_json(node.http_port, f"/dicomweb/studies/{study_uid}/series")
    modalities = sorted(s["00080060"]["Value"][0] for s in series)
    assert {"CR", "OT", "SR"} <= set(modalities), modalities  # OT: the SC (and a PM, if made)
    base = f"http://127.0.0.1:{node.http_port}"
    requests = Requests()
    driver = chrome(tmp_path / "chromium-profile")
    try:
        driver.get(base + "/")
        row = f'tr[data-study="{study_uid}"] a.open-viewer'
        driver.find_element(By.CSS_SELECTOR, row).click()
        WebDriverWait(driver, 60).until(lambda d: "/viewer/viewer" in d.current_url)
        assert driver.current_url == base + viewer_url(study_uid)
        started = time.monotonic()
        try:
            drawn = wait_drawn(driver)
        finally:
            screenshot(driver, tmp_path, "debug-viewer.png")
        took = time.monotonic() - started
        assert max(drawn) > MIN_VARIANCE  # the CR (the hanging protocol's first series)
        skip_tour(driver)
        labels = [
            e.text
            for e in driver.find_elements(By.CSS_SELECTOR, '[data-cy="series-modality-label"]')
        ]
        names = [
            e.text
            for e in driver.find_elements(By.CSS_SELECTOR, '[data-cy="series-description-label"]')
        ]
        assert len(labels) == len(modalities), labels  # every series listed (a PM as PMAP)
        assert {"CR", "OT", "SR"} <= set(labels), labels
        assert SC_SERIES_DESCRIPTION in names and SR_SERIES_DESCRIPTION in names, names
        top_left = driver.find_element(By.CSS_SELECTOR, '[data-cy="viewport-overlay-top-left"]')
        assert "view: PA" in top_left.text  # the CR's own viewport
        screenshot(driver, shots, "ohif-cr.png")

        open_series(driver, "OT")  # the Grad-CAM Secondary Capture
        try:
            WebDriverWait(driver, 60, poll_frequency=0.5).until(
                lambda d: d.execute_script(CANVAS_COLOUR) > MIN_COLOUR_SHARE
            )
        finally:
            screenshot(driver, tmp_path, "debug-sc.png")
        assert max(wait_drawn(driver)) > MIN_VARIANCE
        screenshot(driver, shots, "ohif-gradcam.png")
        requests.read(driver)
        asked = check_requests(requests, base, tmp_path / "viewer_requests.json")
        assert any("/frames/" in key for key in asked), asked  # the images came as WADO-RS frames
        print(f"CR drawn {took:.1f} s after opening; requests: {json.dumps(asked, indent=1)}")
    finally:
        driver.quit()


def _groups_without_region(node: Node, study_uid: str) -> list[str]:
    """The measurement groups (TID 1501/1410, DCM 125007) of our SR with no SCOORD of their own,
    by their tracking identifier: OHIF 3.13.2 cannot show an SR that has one."""
    (sr,) = [
        pydicom.dcmread(p)
        for p in (node.storage / "outbox" / study_uid).rglob("*")
        if p.is_file() and pydicom.dcmread(p, stop_before_pixels=True).Modality == "SR"
    ]

    def walk(items: Any) -> Iterator[Any]:
        for item in items:
            yield item
            yield from walk(item.get("ContentSequence", []))

    missing = []
    for item in walk(sr.ContentSequence):
        if item.ValueType == "CONTAINER" and item.ConceptNameCodeSequence[0].CodeValue == "125007":
            content = list(item.get("ContentSequence", []))
            if not any(c.ValueType in ("SCOORD", "SCOORD3D") for c in content):
                names = [str(c.TextValue) for c in content if c.ValueType == "TEXT"]
                missing.append(names[0] if names else "?")
    return missing


def test_ohif_shows_the_findings_of_our_sr(
    served: tuple[Node, str], tmp_path: Path, shots: Path
) -> None:
    from selenium.webdriver.common.by import By

    node, study_uid = served
    findings = node.study(study_uid)["findings"]
    present = sorted(name for name, f in findings.items() if f["present"])
    if not present and os.environ.get("CXR_TRIAGE_WEB_MODEL") == "default":
        pytest.skip("the shipped model judges no finding present on this image")
    assert present, findings  # the lowered thresholds
    # OHIF 3.13.2 fails on the whole SR (TypeError, error boundary) if one measurement group
    # has no SCOORD of its own; our groups are the regions, the rest is outside them
    assert _groups_without_region(node, study_uid) == []
    base = f"http://127.0.0.1:{node.http_port}"
    requests = Requests()
    driver = chrome(tmp_path / "chromium-profile")
    try:
        driver.get(base + viewer_url(study_uid))
        wait_drawn(driver)
        skip_tour(driver)
        open_series(driver, "SR")

        def shown(d: Any) -> list[str] | None:
            texts = d.execute_script(
                "return Array.from(document.querySelectorAll('svg text, [data-cy] , td, span'))"
                ".map(e => e.textContent)"
            )
            body = d.find_element(By.TAG_NAME, "body").text
            if "Something went wrong" in body:  # OHIF's error boundary: no need to wait on
                screenshot(d, tmp_path, "debug-sr.png")
                console = [e["message"][:300] for e in d.get_log("browser")][-6:]
                raise AssertionError(f"OHIF failed on our SR; browser console: {console}")
            text = " ".join(texts) + body
            # OHIF labels each region with its measurement: "<finding> probability: 0.51 1"
            found = [name for name in present if f"{name} probability: " in text]
            return found if found == present and max(variances(d) or [0]) > MIN_VARIANCE else None

        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            found = WebDriverWait(driver, 45, poll_frequency=0.5).until(shown)
        except TimeoutException:
            screenshot(driver, tmp_path, "debug-sr.png")
            console = [e["message"][:300] for e in driver.get_log("browser")][-15:]
            raise AssertionError(
                f"none of {present} is shown with the image; browser console: {console}"
            ) from None
        assert found == present
        screenshot(driver, shots, "ohif-sr.png")
        requests.read(driver)
        check_requests(requests, base, tmp_path / "sr_requests.json")
    finally:
        driver.quit()
