"""WADO-RS frames and thumbnails as viewers ask for them, against a running node.

Every shared DICOM file (uncompressed, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000,
RLE, MONOCHROME1) is stored by STOW-RS (the two that a node refuses as they are, an invalid SOP
Instance UID and a repeated one, get fresh UIDs; their pixel data stays byte for byte) and its
frames come back through dicomweb-client's ``retrieve_instance_frames``: as stored
(``transfer-syntax=*``: the stored fragment's bytes, which then decode to pydicom's pixels) and
as Explicit VR Little Endian (pydicom's pixels). OHIF's own ``Accept`` headers are sent as it
sends them. The memory bound of a frame request is measured with :mod:`tracemalloc`.
"""

from __future__ import annotations

import functools
import io
import os
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from dicomweb_support import RunningNode, running_node, store_shared
from dicomweb_support import instance_uids as uids
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import RLELossless
from test_node_support import synthetic_cr

from dicom_node.dicomweb import frames

get = functools.partial(httpx.get, timeout=120)
EVLE = "1.2.840.10008.1.2.1"
OHIF_FRAMES = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
SHARED = sorted(
    p.name for p in (Path(os.environ.get("CXR_TRIAGE_SHARED_DATA", _DATA)) / "dicom").glob("*.dcm")
)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    with running_node(tmp_path_factory.mktemp("frames")) as running:
        yield running


@pytest.fixture(scope="module")
def client(node: RunningNode) -> DICOMwebClient:
    return DICOMwebClient(url=node.base)


@pytest.fixture(scope="module")
def stored(client: DICOMwebClient, dicom_dir: Path) -> dict[str, pydicom.Dataset]:
    """File name -> the data set stored (every shared file, by STOW-RS)."""
    return store_shared(client, dicom_dir)


def decode_stored_frame(ds: pydicom.Dataset, frame: bytes) -> np.ndarray:
    """A compressed frame decoded by pydicom, in a copy of its data set."""
    copy = pydicom.Dataset(ds)
    copy.file_meta = ds.file_meta
    copy.PixelData = encapsulate([frame])
    copy.NumberOfFrames = 1
    return copy.pixel_array


def evle_array(ds: pydicom.Dataset, data: bytes) -> np.ndarray:
    reference = ds.pixel_array
    return np.frombuffer(data, dtype=reference.dtype.newbyteorder("<")).reshape(reference.shape)


@pytest.mark.parametrize("name", SHARED)
def test_frame_round_trip_as_stored_and_explicit_le(
    client: DICOMwebClient, stored: dict[str, pydicom.Dataset], name: str
) -> None:
    ds = stored[name]
    reference = ds.pixel_array
    syntax = str(ds.file_meta.TransferSyntaxUID)
    (as_stored,) = client.retrieve_instance_frames(
        *uids(ds), frame_numbers=[1], media_types=(("application/octet-stream", "*"),)
    )
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        (fragment,) = generate_frames(ds.PixelData, number_of_frames=1)
        assert as_stored == fragment  # the stored bitstream, unchanged
        assert np.array_equal(decode_stored_frame(ds, as_stored), reference)
    else:
        assert syntax == EVLE and as_stored == ds.PixelData
    (explicit,) = client.retrieve_instance_frames(
        *uids(ds), frame_numbers=[1], media_types=(("application/octet-stream", EVLE),)
    )
    assert len(explicit) == reference.nbytes
    assert np.array_equal(evle_array(ds, explicit), reference)


@pytest.mark.parametrize("name", SHARED)
def test_what_ohif_asks_for(
    node: RunningNode, stored: dict[str, pydicom.Dataset], name: str
) -> None:
    from PIL import Image

    ds = stored[name]
    study, series, sop = uids(ds)
    instance = f"{node.base}/studies/{study}/series/{series}/instances/{sop}"
    rsp = get(f"{instance}/frames/1", headers={"Accept": OHIF_FRAMES})
    assert rsp.status_code == 200
    assert rsp.headers["content-type"].startswith('multipart/related; type="application/octet')
    head = rsp.content.split(b"\r\n\r\n", 1)[0].decode()
    syntax = str(ds.file_meta.TransferSyntaxUID)
    assert f"Content-Type: application/octet-stream; transfer-syntax={syntax}" in head
    for url in (f"{instance}/thumbnail", f"{node.base}/studies/{study}/series/{series}/thumbnail"):
        thumb = get(url, headers={"Accept": "image/jpeg"})
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        image = Image.open(io.BytesIO(thumb.content))
        assert image.format == "JPEG" and max(image.size) == 256
        assert np.asarray(image).std() > 10  # an image, not a blank
    rsp = get(f"{node.base}/studies/{study}/thumbnail", headers={"Accept": "image/jpeg"})
    assert rsp.status_code == 200 and rsp.content[:3] == b"\xff\xd8\xff"


def test_frame_media_types_and_406(node: RunningNode, stored: dict[str, pydicom.Dataset]) -> None:
    ds = stored["RG1_J2KI.dcm"]
    study, series, sop = uids(ds)
    url = f"{node.base}/studies/{study}/series/{series}/instances/{sop}/frames/1"
    (fragment,) = generate_frames(ds.PixelData, number_of_frames=1)
    jp2 = get(url, headers={"Accept": 'multipart/related; type="image/jp2"'})
    assert jp2.status_code == 200
    assert b"Content-Type: image/jp2; transfer-syntax=1.2.840.10008.1.2.4.91" in jp2.content
    assert fragment in jp2.content
    for accept in (
        'multipart/related; type="image/jpeg"',
        OHIF_FRAMES.replace("*", "1.2.840.10008.1.2.4.50"),
        "image/png",
    ):
        rsp = get(url, headers={"Accept": accept})
        assert rsp.status_code == 406, accept
        assert "1.2.840.10008.1.2.4.91" in rsp.json()["detail"]
    # the first entry that can be given wins; no transfer-syntax means Explicit VR LE
    rsp = get(
        url,
        headers={"Accept": 'multipart/related; type="image/jpeg", ' + OHIF_FRAMES},
    )
    assert rsp.status_code == 200 and fragment in rsp.content
    plain = get(url, headers={"Accept": 'multipart/related; type="application/octet-stream"'})
    assert f"transfer-syntax={EVLE}".encode() in plain.content
    assert len(plain.content) > ds.pixel_array.nbytes


def test_frame_lists_we_refuse(node: RunningNode, stored: dict[str, pydicom.Dataset]) -> None:
    ds = stored["RG1_UNCR.dcm"]
    study, series, sop = uids(ds)
    base = f"{node.base}/studies/{study}/series/{series}/instances/{sop}/frames"
    for frame_list, status, words in (
        ("0", 400, "positive integer"),
        ("-1", 400, "positive integer"),
        ("a", 400, "positive integer"),
        ("1,,1", 400, "positive integer"),
        ("1.0", 400, "positive integer"),
        ("2", 404, "beyond this instance's 1 frame"),
        ("99999999999", 400, "positive integer"),
        (",".join(["1"] * (frames.MAX_FRAMES + 1)), 400, "at most"),
    ):
        rsp = get(f"{base}/{frame_list}", headers={"Accept": OHIF_FRAMES})
        assert rsp.status_code == status, frame_list[:20]
        assert words in rsp.json()["detail"]
    assert get(f"{base}/1".replace(sop, sop + ".9")).status_code == 404
    assert get(f"{base}/1".replace(sop, "1.02")).status_code == 400


def multi_frame(path: Path, count: int, size: int, rle: bool = False) -> pydicom.Dataset:
    """A synthetic multi-frame image (frame ``i`` filled with a ramp plus ``i``)."""
    synthetic_cr(path, size=size)
    ds = pydicom.dcmread(path)
    ramp = np.arange(size * size, dtype=np.uint16).reshape(size, size) % 4000
    stack = np.stack([ramp + i for i in range(count)]).astype(np.uint16)
    ds.NumberOfFrames = count
    ds.PixelData = stack.tobytes()
    if rle:
        ds.compress(RLELossless, stack)
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


@pytest.mark.parametrize("rle", [False, True], ids=["native", "rle"])
def test_several_frames_in_the_order_asked(
    node: RunningNode, client: DICOMwebClient, tmp_path: Path, rle: bool
) -> None:
    ds = multi_frame(tmp_path / "multi.dcm", count=5, size=64, rle=rle)
    client.store_instances([ds])
    reference = ds.pixel_array
    got = list(
        client.retrieve_instance_frames(
            *uids(ds), frame_numbers=[3, 1, 5, 3], media_types=(("application/octet-stream", EVLE),)
        )
    )
    assert len(got) == 4
    for data, number in zip(got, [3, 1, 5, 3], strict=True):
        frame = np.frombuffer(data, dtype="<u2").reshape(64, 64)
        assert np.array_equal(frame, reference[number - 1])
    raw = list(
        client.retrieve_instance_frames(
            *uids(ds), frame_numbers=[2, 4], media_types=(("application/octet-stream", "*"),)
        )
    )
    if rle:
        stored_frames = list(generate_frames(ds.PixelData, number_of_frames=5))
        assert raw == [stored_frames[1], stored_frames[3]]
    else:
        assert raw == [reference[1].tobytes(), reference[3].tobytes()]
    study, series, sop = uids(ds)
    url = f"{node.base}/studies/{study}/series/{series}/instances/{sop}/frames/6"
    assert get(url, headers={"Accept": OHIF_FRAMES}).status_code == 404


def traced_peak(path: Path, decode: bool) -> tuple[int, int]:
    """(body bytes, peak bytes traced) of a request for every frame of ``path``."""
    source = frames.pixel_source(path)
    assert source is not None
    plan = frames.FramePlan(decode, "application/octet-stream")
    tracemalloc.start()
    try:
        _, chunks = frames.frames_response(source, list(range(source.number_of_frames)), plan)
        total = sum(len(chunk) for chunk in chunks)  # each chunk dropped once counted
        return total, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("decode", [False, True], ids=["as-stored", "decoded"])
@pytest.mark.parametrize("rle", [False, True], ids=["native", "rle"])
def test_a_frame_request_holds_one_frame(tmp_path: Path, decode: bool, rle: bool) -> None:
    """Frames of 512 kB: the memory traced while a request's whole multipart body is produced
    (and dropped, as the response writer does) peaks at the same height for 4 frames as for
    16 (8 MB), under four frames (one frame's decode: the decoder's output, the array, the
    bytes handed on)."""
    frame_bytes = 512 * 512 * 2
    peaks = []
    for count in (4, 16):
        multi_frame(tmp_path / f"{count}.dcm", count=count, size=512, rle=rle)
        total, peak = traced_peak(tmp_path / f"{count}.dcm", decode)
        assert total > count * (frame_bytes if decode or not rle else 1000)
        assert peak < 4 * frame_bytes, f"peak {peak} bytes for frames of {frame_bytes}"
        peaks.append(peak)
    assert peaks[1] < peaks[0] + frame_bytes // 4, peaks  # no growth with the frame count


def test_deflated_frames_come_decoded(
    node: RunningNode, client: DICOMwebClient, tmp_path: Path
) -> None:
    """A file stored Deflated (no offset to seek to): ``transfer-syntax=*`` and Explicit VR LE
    both give the inflated native pixels, labelled Explicit VR Little Endian."""
    ds = pydicom.dcmread(synthetic_cr(tmp_path / "d.dcm", size=64, seed=5))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "deflated.dcm", enforce_file_format=True)
    deflated = pydicom.dcmread(tmp_path / "deflated.dcm")
    client.store_instances([deflated])
    for syntax in ("*", EVLE):
        (frame,) = client.retrieve_instance_frames(
            *uids(ds), frame_numbers=[1], media_types=(("application/octet-stream", syntax),)
        )
        assert frame == ds.PixelData
    study, series, sop = uids(ds)
    rsp = get(
        f"{node.base}/studies/{study}/series/{series}/instances/{sop}/frames/1",
        headers={"Accept": OHIF_FRAMES},
    )
    assert f"transfer-syntax={EVLE}".encode() in rsp.content
