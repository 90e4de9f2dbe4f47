"""WADO-RS rendered images (``viewport``, ``window``, ``quality``), rendered frames, and the
bulk data that the metadata names, against a running node holding every shared file.

Rendered pixels are checked against what they must be, not against our own code: a viewport
equal to the image's size leaves the pixels unscaled (PNG, lossless), so a narrow window must
turn every stored value below it white and above it black on a MONOCHROME1 image; the
MONOCHROME1 copy of the SIIM chest must render as the exact negative of the MONOCHROME2
original (same pixels, same automatic window). Every ``BulkDataURI`` of every instance's
metadata, nested ones included, is fetched and compared with the element's value in the file.
"""

from __future__ import annotations

import copy
import functools
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from dicomweb_support import RunningNode, instance_uids, running_node, store_shared
from PIL import Image
from test_node_support import synthetic_cr

get = functools.partial(httpx.get, timeout=120)
SIIM = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    with running_node(tmp_path_factory.mktemp("rendered")) as running:
        yield running


@pytest.fixture(scope="module")
def client(node: RunningNode) -> DICOMwebClient:
    return DICOMwebClient(url=node.base)


@pytest.fixture(scope="module")
def stored(client: DICOMwebClient, dicom_dir: Path) -> dict[str, pydicom.Dataset]:
    return store_shared(client, dicom_dir)


def url_of(node: RunningNode, ds: pydicom.Dataset) -> str:
    study, series, sop = instance_uids(ds)
    return f"{node.base}/studies/{study}/series/{series}/instances/{sop}"


def png(rsp: httpx.Response) -> np.ndarray:
    assert rsp.status_code == 200, rsp.text[:200]
    assert rsp.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(rsp.content)))


def test_viewport_keeps_the_aspect_ratio(node: RunningNode, stored: dict[str, Any]) -> None:
    ds = stored["RG1_UNCR.dcm"]  # 1841 wide, 1955 high
    for viewport, size in (("200,100", (94, 100)), ("100,500", (100, 106)), (None, (964, 1024))):
        params = {"viewport": viewport} if viewport else {}
        rsp = get(f"{url_of(node, ds)}/rendered", params=params, headers={"Accept": "image/jpeg"})
        assert rsp.status_code == 200 and rsp.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(rsp.content)).size == size, viewport
    thumb = get(f"{url_of(node, ds)}/thumbnail", params={"viewport": "64,64"})
    assert Image.open(io.BytesIO(thumb.content)).size == (60, 64)


def test_window_on_monochrome1(node: RunningNode, stored: dict[str, Any]) -> None:
    ds = stored["RG1_UNCR.dcm"]
    values = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(
        ds.get("RescaleIntercept", 0)
    )
    native = f"{ds.Columns},{ds.Rows}"
    center = float(np.median(values))
    width = 200.0
    image = png(
        get(
            f"{url_of(node, ds)}/rendered",
            params={"viewport": native, "window": f"{center},{width},linear"},
            headers={"Accept": "image/png"},
        )
    )
    assert image.shape == values.shape
    below, above = values <= center - width / 2 - 1, values >= center + width / 2
    assert below.any() and above.any()
    assert (image[below] == 255).all() and (image[above] == 0).all()  # MONOCHROME1: inverted
    default = png(
        get(
            f"{url_of(node, ds)}/rendered",
            params={"viewport": native},
            headers={"Accept": "image/png"},
        )
    )
    assert not np.array_equal(default, image)  # the header's window (15000/30000) differs
    sigmoid = png(
        get(
            f"{url_of(node, ds)}/rendered",
            params={"viewport": native, "window": f"{center},{width},sigmoid"},
            headers={"Accept": "image/png"},
        )
    )
    mid = np.abs(values - center) < 1
    assert mid.any() and (np.abs(sigmoid[mid].astype(int) - 128) <= 2).all()


def test_monochrome1_renders_as_the_negative(node: RunningNode, stored: dict[str, Any]) -> None:
    original, inverted = stored[SIIM], stored["Fake_MONOHR1.dcm"]
    assert np.array_equal(original.pixel_array, inverted.pixel_array)
    params = {"viewport": "1024,1024"}
    plain = png(
        get(f"{url_of(node, original)}/rendered", params=params, headers={"Accept": "image/png"})
    )
    negative = png(
        get(f"{url_of(node, inverted)}/rendered", params=params, headers={"Accept": "image/png"})
    )
    assert plain.std() > 20
    assert np.array_equal(negative.astype(int), 255 - plain.astype(int))


def test_quality_frames_rendered_and_refusals(node: RunningNode, stored: dict[str, Any]) -> None:
    url = url_of(node, stored["RG2_JPLL.dcm"])
    low = get(f"{url}/rendered", params={"quality": "5"})
    high = get(f"{url}/rendered", params={"quality": "95"})
    assert low.status_code == high.status_code == 200
    assert len(low.content) < len(high.content) / 2
    frame = get(f"{url}/frames/1/rendered", params={"viewport": "128,128"})
    assert frame.status_code == 200 and frame.content[:3] == b"\xff\xd8\xff"
    for path, params, status, words in (
        ("frames/2/rendered", {}, 404, "beyond"),
        ("frames/1,1/rendered", {}, 400, "one frame"),
        ("rendered", {"viewport": "0,10"}, 400, "viewport"),
        ("rendered", {"viewport": "10,10,0,0,5,5"}, 400, "cropping form"),
        ("rendered", {"viewport": "10.5,10"}, 400, "whole numbers"),
        ("rendered", {"window": "100,200"}, 400, "center,width,function"),
        ("rendered", {"window": "100,0,linear"}, 400, "width"),
        ("rendered", {"window": "100,nan,linear"}, 400, "finite"),
        ("rendered", {"window": "100,10,cubic"}, 400, "function"),
        ("rendered", {"quality": "0"}, 400, "quality"),
        ("thumbnail", {"viewport": "99999,1"}, 400, "viewport"),
    ):
        rsp = get(f"{url}/{path}", params=params)
        assert rsp.status_code == status, (path, params)
        assert words in rsp.json()["detail"]
    assert get(f"{url}/rendered", headers={"Accept": "image/gif"}).status_code == 406
    assert get(f"{url}/thumbnail", headers={"Accept": "application/dicom"}).status_code == 406


def test_an_instance_without_pixels(
    node: RunningNode, client: DICOMwebClient, tmp_path: Path
) -> None:
    """A Basic Text SR: no frames, no rendering, no thumbnail (404 with the reason); its
    series' thumbnail is 404 too, and its study's is the image beside it."""
    image = pydicom.dcmread(synthetic_cr(tmp_path / "cr.dcm", size=64))
    sr = copy.deepcopy(image)
    for keyword in (
        "Rows",
        "Columns",
        "PixelData",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "SamplesPerPixel",
        "PhotometricInterpretation",
    ):
        if keyword in sr:
            delattr(sr, keyword)
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    sr.file_meta.MediaStorageSOPClassUID = sr.SOPClassUID
    sr.SOPInstanceUID = sr.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    sr.SeriesInstanceUID = pydicom.uid.generate_uid()
    sr.Modality = "SR"
    image.preamble = sr.preamble = b"\0" * 128
    answer = client.store_instances([sr, image])
    assert len(answer.ReferencedSOPSequence) == 2
    url = url_of(node, sr)
    for path in ("frames/1", "rendered", "thumbnail"):
        rsp = get(f"{url}/{path}")
        assert rsp.status_code == 404, path
        assert "Pixel Data" in rsp.json()["detail"] or "image" in rsp.json()["detail"]
    study, series, _ = instance_uids(sr)
    assert get(f"{node.base}/studies/{study}/series/{series}/thumbnail").status_code == 404
    assert get(f"{node.base}/studies/{study}/thumbnail").status_code == 200


def bulk_uris(value: Any) -> Iterator[tuple[str, list[str]]]:
    """Every BulkDataURI in DICOM JSON, with the keys leading to it."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "BulkDataURI":
                yield item, []
            else:
                for uri, keys in bulk_uris(item):
                    yield uri, [key, *keys]
    elif isinstance(value, list):
        for index, item in enumerate(value):
            for uri, keys in bulk_uris(item):
                yield uri, [str(index), *keys]


def element_at(ds: pydicom.Dataset, keys: list[str]) -> bytes:
    """The value of the element that the JSON keys (tag, "Value", item, tag, ...) lead to."""
    tags = [k for k in keys if len(k) == 8]
    items = [int(k) for k in keys if k.isdecimal() and len(k) < 8]
    for tag, index in zip(tags[:-1], items, strict=False):
        ds = ds[int(tag, 16)].value[index]
    if tags[-1] == "7FE00010":
        return (
            ds.pixel_array.tobytes()
            if ds.file_meta.TransferSyntaxUID.is_compressed
            else ds.PixelData
        )
    return bytes(ds[int(tags[-1], 16)].value)


def test_every_bulk_data_uri_resolves(
    client: DICOMwebClient, stored: dict[str, Any], tmp_path: Path
) -> None:
    """All shared files, plus one whose Modality LUT Sequence holds a LUT over the inline
    threshold (a nested BulkDataURI, ``.../bulkdata/00283000/0/00283006``)."""
    lut = pydicom.dcmread(synthetic_cr(tmp_path / "lut.dcm", size=64))
    item = pydicom.Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.ModalityLUTType = "HU"
    item.LUTData = np.arange(4096, dtype="<u2").tobytes()
    item["LUTData"].VR = "OW"
    lut.ModalityLUTSequence = pydicom.Sequence([item])
    for keyword in ("RescaleSlope", "RescaleIntercept", "RescaleType"):
        if keyword in lut:
            delattr(lut, keyword)
    lut.preamble = b"\0" * 128
    client.store_instances([lut])
    checked = 0
    nested = 0
    for ds in [*stored.values(), lut]:
        meta = client.retrieve_instance_metadata(*instance_uids(ds))
        found = list(bulk_uris(meta))
        assert any(keys[0] == "7FE00010" for _, keys in found)
        for uri, keys in found:
            (value,) = client.retrieve_bulkdata(uri)
            assert value == element_at(ds, keys), uri
            checked += 1
            nested += "/0/" in uri.split("/bulkdata/")[1]
    assert nested >= 1 and checked >= len(stored) + 2
    base = client.retrieve_instance_metadata(*instance_uids(lut))["7FE00010"]["BulkDataURI"]
    for where, status in (
        ("00283000/1/00283006", 404),
        ("00283000/x/00283006", 400),
        ("0028300/0/00283006", 400),
        ("00283000/0", 400),
        ("00100010", 404),
    ):
        rsp = get(base.replace("7FE00010", where))
        assert rsp.status_code == status, where


def test_thumbnail_accept_forms(node: RunningNode, stored: dict[str, Any]) -> None:
    """The ``accept`` query parameter (OHIF's thumbnail URLs carry ``?accept=image/jpeg``), a
    browser's ``Accept``, and dicomweb-client's multipart form (one image part)."""
    study, series, sop = instance_uids(stored["RG2_JLSL.dcm"])
    url = f"{node.base}/studies/{study}/series/{series}/instances/{sop}/thumbnail"
    browser = "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8"
    for params, accept, media_type in (
        ({"accept": "image/jpeg"}, None, "image/jpeg"),
        ({"accept": "image/png"}, browser, "image/png"),
        ({}, browser, "image/jpeg"),
        ({}, None, "image/jpeg"),
    ):
        headers = {"Accept": accept} if accept else {}
        rsp = get(url, params=params, headers=headers)
        assert rsp.status_code == 200 and rsp.headers["content-type"] == media_type
        assert Image.open(io.BytesIO(rsp.content)).format == media_type.split("/")[1].upper()
    assert get(url, params={"accept": "application/dicom"}).status_code == 406
    rsp = get(
        url,
        params={"accept": "image/jpeg"},
        headers={"Accept": 'multipart/related; type="image/jpeg"'},
    )
    assert rsp.status_code == 200
    assert rsp.headers["content-type"].startswith('multipart/related; type="image/jpeg"; boundary=')
    head, body = rsp.content.split(b"\r\n\r\n", 1)
    assert b"Content-Type: image/jpeg" in head
    assert Image.open(io.BytesIO(body)).format == "JPEG"


def test_study_and_series_rendered(node: RunningNode, stored: dict[str, Any]) -> None:
    """A study's and a series' images, one rendered part each (the SIIM study holds the
    MONOCHROME1 copy in a series of its own)."""
    ds = stored[SIIM]
    study, series, _ = instance_uids(ds)
    in_study = [d for d in stored.values() if d.StudyInstanceUID == study]
    in_series = [d for d in in_study if d.SeriesInstanceUID == series]
    assert len(in_study) > len(in_series) >= 1
    for url, count in (
        (f"{node.base}/studies/{study}/rendered", len(in_study)),
        (f"{node.base}/studies/{study}/series/{series}/rendered", len(in_series)),
    ):
        rsp = get(url, params={"viewport": "64,64"}, headers={"Accept": "image/png"})
        assert rsp.status_code == 200
        content_type = rsp.headers["content-type"]
        assert content_type.startswith('multipart/related; type="image/png"; boundary=')
        boundary = content_type.rsplit("boundary=", 1)[1].encode()
        parts = rsp.content.split(b"--" + boundary)[1:-1]
        assert len(parts) == count >= 1
        for part in parts:
            head, body = part.split(b"\r\n\r\n", 1)
            assert b"Content-Type: image/png" in head
            assert max(Image.open(io.BytesIO(body[:-2])).size) == 64
    assert get(f"{node.base}/studies/1.2.3.404/rendered").status_code == 404
    assert get(f"{node.base}/studies/{study}/rendered", params={"window": "1"}).status_code == 400
