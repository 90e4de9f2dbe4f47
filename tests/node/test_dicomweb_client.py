"""DICOMweb against a real client: PyPI's ``dicomweb-client`` (highdicom's authors) stores the
shared chest files (read in place) by STOW-RS into a running node, then searches them at every
level with QIDO-RS and retrieves instances, metadata, bulk data and rendered images with
WADO-RS; bytes and attributes are compared with the files sent. One node per module."""

from __future__ import annotations

import functools
import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from dicomweb_support import STOW_TYPE, TOKEN, RunningNode, multipart_body, running_node
from test_node_support import dataset_bytes, needs_dcmtk, storescu, synthetic_cr

#: Generous timeouts: the tests share a loaded 2-core machine.
get = functools.partial(httpx.get, timeout=120)
post = functools.partial(httpx.post, timeout=120)
INVALID_UID_FILE = "CR-ModalitySequenceLUT.dcm"  # SOP Instance UID 999.999.01.23.45.6789
DUPLICATE_FILE = "Fake_MONOHR1.dcm"  # the SIIM file's SOP Instance UID, other header
RELATED = 'multipart/related; type="application/dicom"'


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    with running_node(tmp_path_factory.mktemp("dicomweb")) as running:
        yield running


@pytest.fixture(scope="module")
def client(node: RunningNode) -> DICOMwebClient:
    return DICOMwebClient(url=node.base)


@pytest.fixture(scope="module")
def stored(node: RunningNode, client: DICOMwebClient, dicom_dir: Path) -> dict[str, Path]:
    """Every shared file stored in one STOW-RS request; SOP Instance UID -> the file kept."""
    files = sorted(dicom_dir.glob("*.dcm"))
    datasets = [pydicom.dcmread(p) for p in files]
    answer = client.store_instances(datasets)  # 202: one part refused (its UID)
    assert len(answer.ReferencedSOPSequence) == len(files) - 1
    (failed,) = answer.FailedSOPSequence
    assert failed.FailureReason == 0xC000
    kept: dict[str, Path] = {}
    for path, ds in zip(files, datasets, strict=True):
        if path.name != INVALID_UID_FILE:
            kept.setdefault(str(ds.SOPInstanceUID), path)  # a repeat keeps the first copy
    return kept


def test_store_response_lists_stored_and_failed(node: RunningNode, dicom_dir: Path) -> None:
    """The Store Instances Response of the same body sent again (repeats succeed)."""
    files = sorted(dicom_dir.glob("*.dcm"))
    body = multipart_body([("application/dicom", p.read_bytes()) for p in files])
    rsp = post(f"{node.base}/studies", content=body, headers={"Content-Type": STOW_TYPE})
    assert rsp.status_code == 202
    assert rsp.headers["content-type"] == "application/dicom+json"
    answer = pydicom.Dataset.from_json(rsp.json())
    referenced = {str(i.ReferencedSOPInstanceUID) for i in answer.ReferencedSOPSequence}
    assert len(answer.ReferencedSOPSequence) == len(files) - 1
    assert len(referenced) == len(files) - 2  # the duplicate is referenced twice
    (failed,) = answer.FailedSOPSequence
    assert failed.FailureReason == 0xC000
    for item in answer.ReferencedSOPSequence:
        assert item.RetrieveURL.startswith(f"{node.base}/studies/")
        assert item.RetrieveURL.endswith(str(item.ReferencedSOPInstanceUID))


def test_stored_files_are_the_bytes_sent(node: RunningNode, stored: dict[str, Path]) -> None:
    spooled = {p.stem: p for p in node.spool_files()}
    assert set(spooled) == set(stored)
    for sop, original in stored.items():
        assert dataset_bytes(spooled[sop]) == dataset_bytes(original)
    notes = [q.with_suffix(".txt").read_text() for q in node.quarantined()]
    assert notes and all("DICOMWEB" in n and "999.999.01.23.45.6789" in n for n in notes)
    assert node.incoming() == []


def test_search_every_level(client: DICOMwebClient, stored: dict[str, Path]) -> None:
    originals = [pydicom.dcmread(p, stop_before_pixels=True) for p in stored.values()]
    studies = {o.StudyInstanceUID for o in originals}
    found = [pydicom.Dataset.from_json(s) for s in client.search_for_studies()]
    assert {s.StudyInstanceUID for s in found} == studies
    for study in found:
        mine = [o for o in originals if o.StudyInstanceUID == study.StudyInstanceUID]
        assert study.NumberOfStudyRelatedInstances == len(mine)
        assert study.ModalitiesInStudy == "CR"
        assert study.PatientID == mine[0].PatientID
        assert study.StudyDate == mine[0].StudyDate
        series = client.search_for_series(study.StudyInstanceUID)
        assert {pydicom.Dataset.from_json(s).SeriesInstanceUID for s in series} == {
            o.SeriesInstanceUID for o in mine
        }
        for s in series:
            uid = pydicom.Dataset.from_json(s).SeriesInstanceUID
            instances = client.search_for_instances(study.StudyInstanceUID, uid)
            assert {pydicom.Dataset.from_json(i).SOPInstanceUID for i in instances} == {
                o.SOPInstanceUID for o in mine if o.SeriesInstanceUID == uid
            }
    everything = client.search_for_instances()
    assert {pydicom.Dataset.from_json(i).SOPInstanceUID for i in everything} == set(stored)
    first = pydicom.Dataset.from_json(everything[0])
    assert first.StudyInstanceUID and first.SeriesInstanceUID and first.SOPClassUID
    assert len(client.search_for_series()) == len({o.SeriesInstanceUID for o in originals})


def test_matching_keys_limit_offset_includefield(
    client: DICOMwebClient, stored: dict[str, Path]
) -> None:
    def uids(results: list[dict]) -> set[str]:
        return {pydicom.Dataset.from_json(r).StudyInstanceUID for r in results}

    rg = "1.3.6.1.4.1.5962.1.2.9.20040826185059.5457"
    siim = "1.2.276.0.7230010.3.1.2.8323329.6904.1517875201.850818"
    assert uids(client.search_for_studies(search_filters={"StudyInstanceUID": rg})) == {rg}
    both = f"{rg},{siim}"
    assert uids(client.search_for_studies(search_filters={"StudyInstanceUID": both})) == {rg, siim}
    assert siim in uids(client.search_for_studies(search_filters={"StudyDate": "-19991231"}))
    assert rg not in uids(client.search_for_studies(search_filters={"StudyDate": "-19991231"}))
    in_2004 = uids(client.search_for_studies(search_filters={"StudyDate": "20040101-20041231"}))
    assert rg in in_2004 and siim not in in_2004
    assert uids(client.search_for_studies(search_filters={"AccessionNumber": "exam*"})) == {rg}
    assert uids(client.search_for_studies(search_filters={"ModalitiesInStudy": "MR"})) == set()
    assert len(uids(client.search_for_studies(search_filters={"ModalitiesInStudy": "CR"}))) == 3
    page = client.search_for_studies(limit=1, offset=1)
    assert len(page) == 1 and uids(page) < uids(client.search_for_studies())
    rg_files = [p for p in stored.values() if p.name.startswith("RG1")]
    sop_class = str(pydicom.dcmread(rg_files[0], stop_before_pixels=True).SOPClassUID)
    hits = client.search_for_instances(rg, search_filters={"SOPClassUID": sop_class})
    assert len(hits) == 3
    plain = pydicom.Dataset.from_json(
        client.search_for_studies(search_filters={"StudyInstanceUID": rg})[0]
    )
    assert "PatientAge" not in plain
    wide = client.search_for_studies(search_filters={"StudyInstanceUID": rg}, fields=["00101010"])
    original = pydicom.dcmread(rg_files[0], stop_before_pixels=True)
    if "PatientAge" in original:
        assert pydicom.Dataset.from_json(wide[0]).PatientAge == original.PatientAge
    every = client.search_for_instances(rg, fields=["all"])
    assert all("00280010" in e for e in every)  # Rows, from the header


def test_queries_we_refuse(node: RunningNode) -> None:
    for params, words in (
        ({"fuzzymatching": "true"}, "fuzzymatching is not supported"),
        ({"NoSuchAttribute": "x"}, "unknown"),
        ({"00400275.00321060": "x"}, "sequence matching"),
        ({"limit": "-1"}, "limit"),
        ({"NumberOfStudyRelatedInstances": "3"}, "cannot be matched"),
    ):
        rsp = get(f"{node.base}/studies", params=params)
        assert rsp.status_code == 400, params
        assert words in rsp.json()["detail"]
    assert get(f"{node.base}/studies/1.2.03/series").status_code == 400
    assert get(f"{node.base}/studies/..%2F..%2Fetc/series").status_code in (400, 404)
    assert get(f"{node.base}/studies/1.2.3.404").status_code == 404
    rsp = get(f"{node.base}/studies", headers={"Accept": "application/dicom+xml"})
    assert rsp.status_code == 406


def test_retrieve_instances_as_stored(client: DICOMwebClient, stored: dict[str, Path]) -> None:
    for sop, original in stored.items():
        ds = pydicom.dcmread(original, stop_before_pixels=True)
        got = client.retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, sop)
        out = io.BytesIO()
        got.save_as(out, enforce_file_format=True)
        reference = pydicom.dcmread(original)
        assert got.file_meta.TransferSyntaxUID == reference.file_meta.TransferSyntaxUID
        assert got.PixelData == reference.PixelData
        assert got == reference  # every attribute
    rg = "1.3.6.1.4.1.5962.1.2.9.20040826185059.5457"
    assert len(client.retrieve_study(rg)) == 3


def test_retrieve_exact_bytes_and_explicit_little_endian(
    node: RunningNode, stored: dict[str, Path]
) -> None:
    path = next(p for p in stored.values() if p.name == "RG1_J2KR.dcm")
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    series = f"{node.base}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
    url = f"{series}/instances/{ds.SOPInstanceUID}"
    single = get(url, timeout=120, headers={"Accept": "application/dicom"})
    assert single.status_code == 200
    assert single.content[132:].find(dataset_bytes(path)[:256]) > 0
    assert single.content.endswith(dataset_bytes(path))
    explicit = get(
        url,
        timeout=120,
        headers={"Accept": RELATED + "; transfer-syntax=1.2.840.10008.1.2.1"},
    )
    assert explicit.status_code == 200
    part = explicit.content.split(b"\r\n\r\n", 1)[1]
    decoded = pydicom.dcmread(io.BytesIO(part))
    assert decoded.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert (decoded.pixel_array == pydicom.dcmread(path).pixel_array).all()
    other = get(
        url,
        timeout=120,
        headers={"Accept": RELATED + "; transfer-syntax=1.2.840.10008.1.2.4.50"},
    )
    assert other.status_code == 406
    assert get(url, timeout=120, headers={"Accept": "image/png"}).status_code == 406


def test_metadata_and_bulk_data(client: DICOMwebClient, stored: dict[str, Path]) -> None:
    path = next(p for p in stored.values() if p.name == "RG1_UNCR.dcm")
    original = pydicom.dcmread(path)
    meta = client.retrieve_instance_metadata(
        original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID
    )
    uri = meta["7FE00010"]["BulkDataURI"]
    header = pydicom.Dataset.from_json({k: v for k, v in meta.items() if "BulkDataURI" not in v})
    for keyword in ("PatientID", "StudyDate", "Rows", "Columns", "PhotometricInterpretation"):
        assert header[keyword].value == original[keyword].value
    (pixels,) = client.retrieve_bulkdata(uri)
    assert pixels == original.PixelData
    study_meta = client.retrieve_study_metadata(original.StudyInstanceUID)
    assert len(study_meta) == 3
    series_meta = client.retrieve_series_metadata(
        original.StudyInstanceUID, original.SeriesInstanceUID
    )
    assert len(series_meta) == 3


def test_rendered_png_and_jpeg(client: DICOMwebClient, stored: dict[str, Path]) -> None:
    from PIL import Image

    path = next(p for p in stored.values() if p.name == "RG1_J2KR.dcm")
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    uids = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    jpeg = client.retrieve_instance_rendered(*uids)
    png = client.retrieve_instance_rendered(*uids, media_types=("image/png",))
    assert jpeg[:3] == b"\xff\xd8\xff" and png[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(png))
    assert max(image.size) == 1024 and image.size[0] < image.size[1]  # 1841 x 1955, kept
    assert len(np.unique(np.asarray(image))) > 50  # windowed, not blank


@needs_dcmtk
def test_study_half_by_c_store_half_by_stow_is_one_study(node: RunningNode, tmp_path: Path) -> None:
    study = pydicom.uid.generate_uid()
    first = synthetic_cr(tmp_path / "a.dcm", study_uid=study, seed=1)
    second = synthetic_cr(tmp_path / "b.dcm", study_uid=study, seed=2)
    assert storescu(node.settings.port, [first]).returncode == 0
    rsp = post(
        f"{node.base}/studies/{study}",
        content=multipart_body([("application/dicom", second.read_bytes())]),
        headers={"Content-Type": STOW_TYPE},
    )
    assert rsp.status_code == 200
    assert node.worklist.queries.study_detail(study)["num_instances"] == 2
    assert len(list((node.storage / "spool" / study).glob("*/*.dcm"))) == 2
    found = get(f"{node.base}/studies", params={"StudyInstanceUID": study}).json()
    assert pydicom.Dataset.from_json(found[0]).NumberOfStudyRelatedInstances == 2


def test_stow_to_another_study_fails_that_part(node: RunningNode, tmp_path: Path) -> None:
    other = synthetic_cr(tmp_path / "c.dcm", seed=3)
    target = pydicom.uid.generate_uid()
    before = len(node.quarantined())
    rsp = post(
        f"{node.base}/studies/{target}",
        content=multipart_body([("application/dicom", other.read_bytes())]),
        headers={"Content-Type": STOW_TYPE},
    )
    assert rsp.status_code == 409
    (failed,) = pydicom.Dataset.from_json(rsp.json()).FailedSOPSequence
    assert failed.FailureReason == 0xA900
    assert failed.ReferencedSOPInstanceUID == pydicom.dcmread(other).SOPInstanceUID
    assert len(node.quarantined()) == before + 1
    assert not (node.storage / "spool" / target).exists()


def test_token_is_required_when_set(tmp_path: Path, dicom_dir: Path) -> None:
    path = dicom_dir / "RG1_UNCR.dcm"
    with running_node(tmp_path / "auth", http_token=TOKEN) as secured:
        body = multipart_body([("application/dicom", path.read_bytes())])
        headers = {"Content-Type": STOW_TYPE}
        assert post(f"{secured.base}/studies", content=body, headers=headers).status_code == 401
        assert get(f"{secured.base}/studies").status_code == 401
        assert secured.spool_files() == []
        authed = DICOMwebClient(url=secured.base, headers={"Authorization": f"Bearer {TOKEN}"})
        authed.store_instances([pydicom.dcmread(path)])
        assert len(authed.search_for_studies()) == 1


def wait_for(check: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_our_results_are_found_beside_the_received_series(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """A study stored by STOW-RS and processed by the node's worker (random-weight model:
    plumbing only) lists its SR series and its Grad-CAM SC series; both are retrieved and the
    SC renders in colour."""
    from PIL import Image

    study = pydicom.uid.generate_uid()
    source = synthetic_cr(tmp_path / "chest.dcm", study_uid=study, size=256, seed=11)
    with running_node(tmp_path / "processed", model=tiny_checkpoint) as node:
        client = DICOMwebClient(url=node.base)
        client.store_instances([pydicom.dcmread(source)])
        wait_for(lambda: (node.worklist.queries.study_detail(study) or {}).get("status") == "done")
        outputs = sorted((node.storage / "outbox" / study).glob("*.dcm"))
        assert len(outputs) == 2
        series = [pydicom.Dataset.from_json(s) for s in client.search_for_series(study)]
        assert sorted(s.Modality for s in series) == ["CR", "OT", "SR"]
        found = pydicom.Dataset.from_json(
            client.search_for_studies(search_filters={"StudyInstanceUID": study})[0]
        )
        assert found.NumberOfStudyRelatedSeries == 3
        assert found.NumberOfStudyRelatedInstances == 3
        assert set(found.ModalitiesInStudy) == {"CR", "SR", "OT"}
        for path in outputs:
            ours = pydicom.dcmread(path)
            got = client.retrieve_instance(study, ours.SeriesInstanceUID, ours.SOPInstanceUID)
            assert got == ours
        sc = next(pydicom.dcmread(p) for p in outputs if pydicom.dcmread(p).Modality == "OT")
        png = client.retrieve_instance_rendered(
            study, sc.SeriesInstanceUID, sc.SOPInstanceUID, media_types=("image/png",)
        )
        assert Image.open(io.BytesIO(png)).mode == "RGB"
        (frame,) = client.retrieve_instance_frames(
            study,
            sc.SeriesInstanceUID,
            sc.SOPInstanceUID,
            frame_numbers=[1],
            media_types=(("application/octet-stream", "*"),),
        )
        assert frame == sc.PixelData  # our SC is native RGB: its frame is its pixel data
        # the study's thumbnail is the received radiograph (grey), not our heatmap (colour)
        thumb = get(f"{node.base}/studies/{study}/thumbnail", headers={"Accept": "image/png"})
        assert Image.open(io.BytesIO(thumb.content)).mode == "L"
        sc_series = f"{node.base}/studies/{study}/series/{sc.SeriesInstanceUID}/thumbnail"
        assert Image.open(io.BytesIO(get(sc_series).content)).mode == "RGB"
        hits = client.search_for_instances(
            study, search_filters={"SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.34"}
        )
        assert len(hits) == 1  # the Comprehensive 3D SR
