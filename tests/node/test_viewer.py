"""``triage viewer install``, the ``/viewer/`` mount, the "Open in viewer" links and CORS.

The install runs for real: ``npm pack @ohif/app@3.13.2`` once per run (test_viewer_support.py;
skipped with npm's reason without npm or the registry), checked and unpacked by the code under
test. The tarball safety checks run on hostile tarballs built here. Serving goes through the
application ``triage serve`` builds (TestClient); the browser test is test_viewer_browser.py.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_api_http import study
from test_viewer_support import copy_viewer, ohif_storage, ohif_tarball
from test_web_pages import TOKEN, wl

from dicom_node import web
from dicom_node.dicomweb.router import dicomweb_router
from dicom_node.settings import NodeSettings, check_origin, load_settings
from dicom_node.web.api import create_app
from dicom_node.web.viewer_install import (
    OHIF_INTEGRITY,
    NpmUnavailable,
    ViewerInstallError,
    dist_dir,
    install_viewer,
    installed_viewer,
    integrity_of,
    is_installed,
    npm_pack,
    rebase,
    unpack_dist,
)
from triage_core.errors import ConfigError
from triage_core.worklist import Worklist

__all__ = ["ohif_storage", "ohif_tarball", "wl"]  # fixtures used here

ORIGIN = "https://ohif.example.org"


def client(wl: Worklist, storage: Path, **settings: object) -> TestClient:
    s = NodeSettings(storage=storage, **settings)  # type: ignore[arg-type]
    app = create_app(wl)
    web.install(app, s, wl)
    app.include_router(dicomweb_router(s, wl, lambda: None))
    return TestClient(app)


# ---------------------------------------------------------------------------------- install
def test_install_from_npm_checks_rebases_and_configures(
    ohif_storage: Path, ohif_tarball: Path
) -> None:
    assert integrity_of(ohif_tarball) == OHIF_INTEGRITY
    record = installed_viewer(ohif_storage)
    assert record is not None and (record.package, record.version) == ("@ohif/app", "3.13.2")
    assert record.files > 200 and record.bytes > 100 << 20
    dist = dist_dir(ohif_storage)
    index = (dist / "index.html").read_text(encoding="utf-8")
    assert index.count('window.PUBLIC_URL="/viewer/"') == 2
    assert not re.findall(r'(?:href|src)="/(?!viewer/)', index)  # nothing loads from the root
    assert "init-service-worker" not in index  # it would fetch Workbox from Google's CDN
    for script in dist.glob("*.js"):
        assert '__webpack_require__.p = "/";' not in script.read_text(errors="replace"), script
    for style in dist.glob("*.css"):
        assert "url(/" not in style.read_text().replace("url(/viewer/", ""), style
    assert list(dist.glob("*.wasm"))
    assert '"/assets/' not in (dist / "manifest.json").read_text(encoding="utf-8")
    assert not (dist.parent / "dist" / "installed.json").exists()  # the record is not served

    # the configuration as the browser evaluates it
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: app-config.js not evaluated")
    script = (
        "global.window = {location: {origin: 'https://node.example:8443'}};"
        f"require({json.dumps(str(dist / 'app-config.js'))});"
        "const c = window.config; c.httpErrorHandler = typeof c.httpErrorHandler;"
        "console.log(JSON.stringify(c));"
    )
    proc = subprocess.run([node, "-e", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    config = json.loads(proc.stdout)
    assert config["routerBasename"] == "/viewer"
    assert config["dangerouslyUseDynamicConfig"]["enabled"] is False
    assert "customizationUrlPrefixes" not in config and "oidc" not in config
    assert config["httpErrorHandler"] == "function"
    (source,) = config["dataSources"]
    assert source["namespace"] == "@ohif/extension-default.dataSourcesModule.dicomweb"
    assert config["defaultDataSourceName"] == source["sourceName"]
    roots = {source["configuration"][k] for k in ("qidoRoot", "wadoRoot", "wadoUriRoot")}
    assert roots == {"https://node.example:8443/dicomweb"}
    urls = re.findall(r"https?://[^\s\"']+", (dist / "app-config.js").read_text())
    assert urls == [], urls  # no other origin named anywhere in our configuration


def test_wrong_or_truncated_tarball_is_refused_and_the_viewer_stays(
    ohif_storage: Path, ohif_tarball: Path, tmp_path: Path
) -> None:
    storage = tmp_path / "node"
    copy_viewer(ohif_storage, storage)
    before = installed_viewer(storage)
    truncated = tmp_path / "ohif-app-3.13.2.tgz"
    truncated.write_bytes(ohif_tarball.read_bytes()[: 1 << 20])
    with pytest.raises(ViewerInstallError, match="integrity is sha512-.*the pinned one"):
        install_viewer(storage, truncated)
    assert installed_viewer(storage) == before and is_installed(storage)
    assert not list(storage.glob(".viewer-new-*"))  # the work folder is gone


def _tarball(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            archive.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


def _file(name: str) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), b"<!doctype html>"


def _special(name: str, kind: bytes, target: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, b""


@pytest.mark.parametrize(
    ("hostile", "message"),
    [
        (_file("package/dist/../../escaped.html"), "outside the destination"),
        (_special("package/dist/link", tarfile.SYMTYPE, "/etc/passwd"), "not a regular file"),
        (_special("package/dist/hard", tarfile.LNKTYPE, "package/dist/index.html"), "not a reg"),
        (_special("package/dist/dev", tarfile.CHRTYPE), "not a regular file"),
        (_special("package/dist/fifo", tarfile.FIFOTYPE), "not a regular file"),
    ],
    ids=["dotdot", "symlink", "hardlink", "device", "fifo"],
)
def test_unpack_refuses_traversal_links_and_devices(
    tmp_path: Path, hostile: tuple[tarfile.TarInfo, bytes], message: str
) -> None:
    bad = _tarball(tmp_path / "bad.tgz", [_file("package/dist/index.html"), hostile])
    dest = tmp_path / "out" / "dist"
    dest.mkdir(parents=True)
    with pytest.raises(ViewerInstallError, match=message):
        unpack_dist(bad, dest)
    assert (
        not (tmp_path / "escaped.html").exists()
        and not (tmp_path / "out" / "escaped.html").exists()
    )


def test_unpack_takes_dist_only_and_strips_absolute_names(tmp_path: Path) -> None:
    ok = _tarball(
        tmp_path / "ok.tgz",
        [
            _file("package/dist/index.html"),
            _file("package/dist//abs.html"),  # an absolute name after the prefix: kept inside
            _file("package/README.md"),
            _file("other/dist/x.js"),
        ],
    )
    dest = tmp_path / "dist"
    dest.mkdir()
    assert unpack_dist(ok, dest) == (2, 2 * len(b"<!doctype html>"))
    assert sorted(p.name for p in dest.iterdir()) == ["abs.html", "index.html"]
    no_index = _tarball(tmp_path / "none.tgz", [_file("package/dist/app.js")])
    (tmp_path / "d2").mkdir()
    with pytest.raises(ViewerInstallError, match="no package/dist/index.html"):
        unpack_dist(no_index, tmp_path / "d2")


def test_rebase_refuses_a_build_it_does_not_know(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text('<script src="/app.js"></script>')
    with pytest.raises(ViewerInstallError, match="not the @ohif/app@3.13.2 build"):
        rebase(tmp_path)


def test_without_npm_or_registry_the_install_says_why(tmp_path: Path) -> None:
    with pytest.raises(NpmUnavailable, match="npm is not installed"):
        npm_pack(tmp_path, npm=str(tmp_path / "no-npm"))
    proc = subprocess.run(
        [sys.executable, "-m", "dicom_node", "viewer", "install", "--storage", str(tmp_path)]
        + ["--npm", shutil.which("false") or "/bin/false"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "triage viewer install: error: npm pack failed (exit 1)" in proc.stderr
    assert not is_installed(tmp_path) and not list(tmp_path.glob(".viewer-new-*"))


def test_cli_installs_from_a_local_tarball(ohif_tarball: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dicom_node", "viewer", "install", "--storage", str(tmp_path)]
        + ["--tarball", str(ohif_tarball)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "installed @ohif/app@3.13.2" in proc.stdout and "/viewer/" in proc.stdout
    assert is_installed(tmp_path)


# ---------------------------------------------------------------------------------- serving
def test_without_the_viewer_viewer_says_how_and_pages_do_not_change(
    wl: Worklist, tmp_path: Path
) -> None:
    c = client(wl, tmp_path)
    for path in ("/viewer/", "/viewer/viewer?StudyInstanceUIDs=" + study(2), "/viewer/app.js"):
        page = c.get(path)
        assert page.status_code == 404, path
        assert "triage viewer install --storage " + str(tmp_path.resolve()) in page.text
    assert "Open in viewer" not in c.get("/").text
    assert "Open in viewer" not in c.get(f"/studies/{study(2)}").text


def test_installed_viewer_is_served_with_history_fallback_and_mime_types(
    wl: Worklist, ohif_storage: Path, tmp_path: Path
) -> None:
    copy_viewer(ohif_storage, tmp_path)
    c = client(wl, tmp_path)
    assert c.get("/viewer", follow_redirects=False).headers["location"].endswith("/viewer/")
    index = c.get("/viewer/")
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert 'window.PUBLIC_URL="/viewer/"' in index.text
    csp = index.headers["content-security-policy"]
    assert "connect-src 'self' blob: data:" in csp and "default-src 'self'" in csp
    opened = c.get(f"/viewer/viewer?StudyInstanceUIDs={study(2)}")
    assert opened.status_code == 200 and opened.text == index.text  # OHIF's route, same page
    assert c.get("/viewer/viewer/dicomweb").text == index.text
    config = c.get("/viewer/app-config.js")
    assert config.headers["content-type"].startswith("text/javascript")
    assert "routerBasename" in config.text
    wasm = next(dist_dir(tmp_path).glob("*.wasm")).name
    got = c.get(f"/viewer/{wasm}")
    assert got.status_code == 200 and got.headers["content-type"] == "application/wasm"
    assert got.content[:4] == b"\0asm"
    assert c.get("/viewer/missing.bundle.js").status_code == 404  # assets do not fall back
    assert c.get("/viewer/..%2finstalled.json").status_code == 404
    assert c.post("/viewer/").status_code == 405

    row = c.get("/").text.split(f'data-study="{study(2)}"')[1].split("</tr>")[0]
    link = f'href="/viewer/viewer?StudyInstanceUIDs={study(2)}">Open in viewer</a>'
    assert link in row
    assert link in c.get(f"/studies/{study(2)}").text


def test_viewer_is_behind_the_access_check(
    wl: Worklist, ohif_storage: Path, tmp_path: Path
) -> None:
    copy_viewer(ohif_storage, tmp_path)
    c = client(wl, tmp_path, http_token=TOKEN)
    assert c.get("/viewer/").status_code == 401
    assert c.get("/viewer/app-config.js").status_code == 401
    ok = c.get("/viewer/", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200
    login = c.get(
        f"/viewer/viewer?StudyInstanceUIDs={study(2)}&token={TOKEN}", follow_redirects=False
    )
    assert login.status_code == 303 and "token" not in login.headers["location"]
    assert c.get(login.headers["location"]).status_code == 200  # the cookie now opens it


# ---------------------------------------------------------------------------------- CORS
def test_cors_origins_are_validated_and_normalised(monkeypatch: pytest.MonkeyPatch) -> None:
    assert NodeSettings().cors_allow_origins == []
    assert check_origin(" HTTPS://Ohif.Example.org:443 ") == "https://ohif.example.org"
    assert check_origin("http://10.0.0.5:3000") == "http://10.0.0.5:3000"
    assert check_origin("http://[::1]:80") == "http://[::1]"
    for bad, why in [
        ("*", "credentials"),
        ("null", "credentials"),
        ("https://ohif.example.org/", "not an origin"),
        ("https://ohif.example.org/viewer", "not an origin"),
        ("ftp://ohif.example.org", "not an origin"),
        ("ohif.example.org", "not an origin"),
        ("https://user@ohif.example.org", "not an origin"),
        ("https://ohif.example.org:99999", "not 1-65535"),
    ]:
        with pytest.raises(ConfigError, match=f"cors_allow_origins.*{why}"):
            load_settings(None, {"cors_allow_origins": [bad]})
    monkeypatch.setenv("TRIAGE_CORS_ALLOW_ORIGINS", f"{ORIGIN},http://localhost:3000")
    assert load_settings().cors_allow_origins == [ORIGIN, "http://localhost:3000"]


def test_cors_answers_for_dicomweb_and_the_named_origins_only(wl: Worklist, tmp_path: Path) -> None:
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "GET"}
    preflight["Access-Control-Request-Headers"] = "authorization, accept"
    plain = client(wl, tmp_path)
    answer = plain.get("/dicomweb/studies", headers={"Origin": ORIGIN})
    assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers

    c = client(wl, tmp_path, cors_allow_origins=[ORIGIN], http_token=TOKEN)
    ok = c.options("/dicomweb/studies", headers=preflight)  # no token: preflights carry none
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == ORIGIN
    assert ok.headers["access-control-allow-credentials"] == "true"
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    other = c.options("/dicomweb/studies", headers={**preflight, "Origin": "https://evil.example"})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    auth = {"Origin": ORIGIN, "Authorization": f"Bearer {TOKEN}"}
    got = c.get("/dicomweb/studies", headers=auth)
    assert got.status_code == 200 and got.headers["access-control-allow-origin"] == ORIGIN
    assert c.get("/dicomweb/studies", headers={"Origin": ORIGIN}).status_code == 401
    api = c.get("/api/worklist", headers=auth)
    assert api.status_code == 200 and "access-control-allow-origin" not in api.headers
    assert c.options("/api/worklist", headers=preflight).status_code in (401, 405)
