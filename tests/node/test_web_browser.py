"""The web pages in a real browser: Debian's headless Chromium driven by Selenium.

A real ``triage serve`` (random-weight ``tiny_checkpoint``: plumbing, the scores mean nothing)
receives real studies sent with DCMTK ``dcmsend``; a DCMTK ``storescp`` destination receives the
SR and SC, a second destination is down. The test opens the worklist, checks its order against
``triage worklist --format json``, that the filters survive the self-refresh, opens a study,
checks that the Grad-CAM overlay and the source image loaded, that no request left the host and
that no patient name is on any page, opens the operations page, and saves screenshots.

``CXR_TRIAGE_SCREENSHOTS=DIR`` saves the screenshots there (the README's come from
``CXR_TRIAGE_SCREENSHOTS=docs/img CXR_TRIAGE_WEB_MODEL=default``, the shipped model).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pydicom
import pytest
from test_node_e2e import Node, http_json, wait_for
from test_node_support import free_port, needs_dcmtk, storescp_destination

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
DCMSEND = "/usr/bin/dcmsend"

pytestmark = [
    needs_dcmtk,
    pytest.mark.skipif(
        not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
        reason="Debian chromium and chromium-driver are not installed (make system-deps)",
    ),
]

#: Real chest studies (two transfer syntaxes) and a hip (not eligible).
SENT = ("RG1_UNCR.dcm", "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm")
HIP = "RG2_JPLL.dcm"
#: Real NIH images (PNG) wrapped as CR studies of their own, to fill the worklist.
NIH_COUNT = 3
FINISHED = ("done", "not_eligible", "failed")


def wrap_png(png: Path, out: Path, n: int) -> Path:
    """A real NIH PNG as a CR PA chest DICOM with new UIDs and no patient name."""
    from PIL import Image
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    pixels = np.asarray(Image.open(png).convert("L"), dtype=np.uint8)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.UID("1.2.840.10008.5.1.4.1.1.1")
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.PatientName, ds.PatientID, ds.AccessionNumber = "", f"NIH{n}", f"NIH-ACC-{n}"
    ds.StudyDate, ds.StudyTime, ds.SeriesNumber, ds.InstanceNumber = "20260101", "120000", 1, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(out, enforce_file_format=True)
    return out


def dcmsend(port: int, files: list[Path]) -> None:
    proc = subprocess.run(
        [
            DCMSEND,
            "-aet",
            "WEBTEST",
            "-aec",
            "CXR_TRIAGE",
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def cli_worklist(storage: Path) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, "-m", "dicom_node", "worklist", "--storage", str(storage)]
        + ["--format", "json", "--limit", "1000"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return list(json.loads(proc.stdout))


def chrome(profile: Path) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not look for a browser to fetch
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(180)
    driver.set_script_timeout(60)
    return driver


def requested_urls(driver: Any) -> list[str]:
    """Every URL the browser asked for since the last call (DevTools performance log)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    resources = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    return urls + list(resources)


def assert_local(urls: list[str], base: str) -> None:
    """No network request (http, https, ws) to any other host than ours; ``chrome://``,
    ``data:`` and ``blob:`` URLs stay inside the browser."""
    host = urlsplit(base).netloc
    network = [u for u in urls if urlsplit(u).scheme in ("http", "https", "ws", "wss")]
    ours = [u for u in network if urlsplit(u).netloc == host]
    assert any("/static/swagger/" in u for u in ours) and any(".png" in u for u in ours), ours
    remote = [u for u in network if urlsplit(u).netloc != host]
    assert not remote, f"requests left the host: {remote}"


def screenshot(driver: Any, folder: Path, name: str) -> Path:
    driver.set_window_size(1400, 700)  # scrollHeight is at least the viewport: start small
    for _ in range(2):  # the viewport is smaller than the window: measure again after resizing
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1400, min(max(int(height) + 140, 700), 2600))
    path = folder / name
    assert driver.save_screenshot(str(path)), f"no screenshot {path}"
    assert path.stat().st_size > 10_000
    return path


@pytest.fixture
def served(
    tmp_path: Path, tiny_checkpoint: Path, dicom_dir: Path, cxr14_dir: Path
) -> Iterator[tuple[Node, Path]]:
    model = tiny_checkpoint
    extra = ["--destination", f"VIEWER@127.0.0.1:{free_port()}"]  # down: deliveries stay pending
    if os.environ.get("CXR_TRIAGE_WEB_MODEL") == "default":
        from triage_core.models import default_checkpoint_path

        model = default_checkpoint_path()
    dest = free_port()
    node = Node(tmp_path, model, dest, extra)
    node.env["TRIAGE_DELIVERY_BACKOFF"] = "5"
    node.env["TRIAGE_DELIVERY_BACKOFF_MAX"] = "30"
    with storescp_destination(tmp_path / "pacs", dest):
        node.start()
        try:
            yield node, dicom_dir
        finally:
            node.proc.stop()


def test_worklist_and_study_pages_in_chromium(
    served: tuple[Node, Path], cxr14_dir: Path, tmp_path: Path
) -> None:
    node, dicom_dir = served
    files = [dicom_dir / name for name in (*SENT, HIP)]
    files += [
        wrap_png(png, tmp_path / f"nih{i}.dcm", i)
        for i, png in enumerate(sorted((cxr14_dir / "full").glob("*.png"))[:NIH_COUNT])
    ]
    names = {str(pydicom.dcmread(f, stop_before_pixels=True).get("PatientName", "")) for f in files}
    names.discard("")
    studies = {pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID for f in files}
    # the first file goes with the very command the start banner suggests
    banner = next(x for x in node.proc.log().splitlines() if "dcmsend -aec" in x).split()
    assert banner[-4:] == ["CXR_TRIAGE", "127.0.0.1", str(node.port), "study/*.dcm"], banner
    proc = subprocess.run(
        [*banner[:-1], str(files[0])], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for path in files[1:]:
        dcmsend(node.port, [path])

    def all_finished() -> bool:
        rows = node.studies()
        return set(rows) >= studies and all(rows[u]["status"] in FINISHED for u in studies)

    wait_for(all_finished, 900, "every study processed", node.proc.log)
    rows = node.studies()
    assert (
        rows[pydicom.dcmread(dicom_dir / HIP, stop_before_pixels=True).StudyInstanceUID]["status"]
        == "not_eligible"
    )
    done = [u for u in studies if rows[u]["status"] == "done"]
    assert done, rows

    def sc_sent() -> bool:
        return all(any(d["status"] == "sent" for d in node.study(u)["deliveries"]) for u in done)

    wait_for(sc_sent, 300, "results delivered to PACS", node.proc.log)

    shots = Path(os.environ.get("CXR_TRIAGE_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    base = f"http://127.0.0.1:{node.http_port}"
    driver = chrome(tmp_path / "chromium-profile")
    try:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import Select, WebDriverWait

        driver.get(base + "/")
        page_rows = driver.find_elements(By.CSS_SELECTOR, "#worklist-rows tr.row")
        shown = [r.get_attribute("data-study") for r in page_rows]
        expected = [r["study_uid"] for r in cli_worklist(node.storage)]
        assert set(shown) == studies
        assert shown == [u for u in expected if u in studies], (shown, expected)
        badges = driver.find_elements(By.CSS_SELECTOR, "#worklist-rows .badge")
        assert {b.text.lower() for b in badges} & {"routine", "urgent", "critical"}
        states = {e.text for e in driver.find_elements(By.CSS_SELECTOR, "#worklist-rows .dl")}
        assert any(s.startswith("PACS ") for s in states), states
        assert any(s.startswith("VIEWER 0/") for s in states), states
        assert "not eligible" in driver.page_source
        screenshot(driver, shots, "worklist.png")
        source_pages = [driver.page_source]

        # filters survive the self-refresh (the table is refetched with the page's query)
        driver.get(base + "/?status=done")
        WebDriverWait(driver, 120).until(
            lambda d: int(d.execute_script("return document.body.dataset.refreshed || 0")) >= 1
        )
        statuses = {e.text for e in driver.find_elements(By.CSS_SELECTOR, "#worklist-rows .status")}
        assert statuses == {"done"}, statuses
        assert Select(driver.find_element(By.NAME, "status")).first_selected_option.text == "done"
        assert len(driver.find_elements(By.CSS_SELECTOR, "#worklist-rows tr.row")) == len(done)

        # a study: overlay rendered from the SC we built, beside its source image
        top_done = next(u for u in shown if u in done)
        driver.get(base + "/")
        driver.find_element(By.CSS_SELECTOR, f'tr[data-study="{top_done}"] td.uid a').click()
        WebDriverWait(driver, 120).until(lambda d: d.find_elements(By.ID, "overlay"))
        loaded = (
            "const i = document.getElementById(arguments[0]);"
            "return i.complete && i.naturalWidth > 0 ? i.naturalWidth : 0;"
        )
        WebDriverWait(driver, 180).until(lambda d: d.execute_script(loaded, "overlay"))
        WebDriverWait(driver, 180).until(lambda d: d.execute_script(loaded, "source"))
        assert driver.execute_script(loaded, "overlay") > 0
        bars = driver.find_elements(By.CSS_SELECTOR, ".bar .fill")
        assert bars and all(b.value_of_css_property("width") != "0px" for b in bars[:1])
        assert top_done in driver.page_source
        assert "random-test-model" in driver.page_source or os.environ.get("CXR_TRIAGE_WEB_MODEL")
        screenshot(driver, shots, "study.png")
        source_pages.append(driver.page_source)

        driver.get(base + "/operations")
        tiles = driver.find_elements(By.CSS_SELECTOR, ".tile .big")
        assert len(tiles) == 4 and tiles[0].text == "0"  # nothing queued any more
        drift_rows = driver.find_elements(By.CSS_SELECTOR, "table.drift tr")
        assert len(drift_rows) >= 4, "one row per finding"  # header + 3 findings
        assert int(tiles[1].text) >= len(done)  # studies finished in the last hour
        screenshot(driver, shots, "operations.png")
        source_pages.append(driver.page_source)

        driver.get(base + "/docs")
        WebDriverWait(driver, 120).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, ".swagger-ui .opblock")
        )
        assert_local(requested_urls(driver), base)
        for page in source_pages:
            for name in names:
                assert name not in page, "a patient name is on a page"
        browser_errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        assert not browser_errors, browser_errors
    finally:
        driver.quit()
    # the API agrees with what the page showed for the opened study
    detail = http_json(node.http_port, f"/api/studies/{top_done}")
    assert detail["status"] == "done"
