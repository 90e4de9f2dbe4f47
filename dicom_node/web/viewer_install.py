"""``triage viewer install``: the pinned OHIF build from npm, checked, unpacked, configured.

The viewer is the ``dist/`` folder of the npm package ``@ohif/app`` (:data:`OHIF_VERSION`): a
built single-page application, no build step. :func:`install_viewer`

1. gets the tarball with ``npm pack`` (or takes a local one, for a machine without the
   registry), refuses it unless its SHA-512 is :data:`OHIF_INTEGRITY` (computed here from the
   file, not taken from npm's word; the pin was read once from ``npm view
   @ohif/app@3.13.2 dist.integrity``);
2. unpacks ``package/dist/`` only, with :func:`tarfile.data_filter` (no absolute paths, no
   ``..``, no links out of the folder, no device files) and, on top of it, regular files and
   folders only, bounded in count and size;
3. rebases the build under :data:`VIEWER_BASE`: the build loads its bundles from ``/``
   (``window.PUBLIC_URL="/"`` and ``__webpack_require__.p = "/"`` are compiled in), so
   ``index.html``, ``manifest.json``, the webpack runtimes and the style sheets (``url(/``)
   that name the root are rewritten to ``/viewer/``; each rewrite must find what it replaces,
   so another build fails loudly instead of half-working;
4. drops the service-worker loader from ``index.html`` (it would fetch Workbox from Google's
   CDN) and writes our ``app-config.js`` (:func:`app_config`);
5. swaps the new folder in whole (rename), with ``installed.json`` saying what is there.

The result lives in ``STORAGE/viewer/`` (:func:`viewer_dir`): ``dist/`` (what ``/viewer/``
serves) and ``installed.json``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from triage_core.errors import TriageError

logger = logging.getLogger(__name__)

OHIF_PACKAGE = "@ohif/app"
OHIF_VERSION = "3.13.2"
#: ``npm view @ohif/app@3.13.2 dist.integrity`` (the registry's SHA-512 of the tarball).
OHIF_INTEGRITY = (
    "sha512-"
    "WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
)
#: The URL prefix the viewer is served under (OHIF's ``routerBasename``).
VIEWER_BASE = "/viewer"
#: The DICOMweb root of this node, the viewer's only data source.
DICOMWEB_ROOT = "/dicomweb"
#: Bounds on what we download and unpack (3.13.2: 49.9 MB, 249 files, 213 MB unpacked).
MAX_TARBALL = 200 << 20
MAX_MEMBERS = 5000
MAX_UNPACKED = 1 << 30
NPM_TIMEOUT = 600.0
_DIST = "package/dist/"
#: The webpack runtimes of the build set the public path to the root.
_WEBPACK_ROOT = '__webpack_require__.p = "/";'
_SERVICE_WORKER_TAG = (
    '<script rel="preload" as="script" type="module" src="/init-service-worker.js"></script>'
)


class ViewerInstallError(TriageError):
    """The viewer cannot be fetched, checked or unpacked; the message says why."""


class NpmUnavailable(ViewerInstallError):
    """npm is missing, or cannot get the package (registry unreachable, timeout)."""


@dataclass(frozen=True)
class InstalledViewer:
    """What ``installed.json`` records about an installed viewer."""

    package: str
    version: str
    integrity: str
    base: str
    files: int
    bytes: int
    installed_at: float


def viewer_dir(storage: Path) -> Path:
    """The viewer's folder under a node's storage folder."""
    return Path(storage) / "viewer"


def dist_dir(storage: Path) -> Path:
    """The folder ``/viewer/`` serves."""
    return viewer_dir(storage) / "dist"


def is_installed(storage: Path) -> bool:
    """Whether ``/viewer/`` serves a viewer (its ``index.html`` exists)."""
    return (dist_dir(storage) / "index.html").is_file()


def installed_viewer(storage: Path) -> InstalledViewer | None:
    """The installed viewer of ``storage`` (``None`` when none is, or its record is unreadable)."""
    record = viewer_dir(storage) / "installed.json"
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
        found = InstalledViewer(**data)
    except (OSError, ValueError, TypeError):
        return None
    return found if (dist_dir(storage) / "index.html").is_file() else None


def integrity_of(path: Path) -> str:
    """The npm ``dist.integrity`` string (``sha512-`` + base64) of a file."""
    digest = hashlib.sha512()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return "sha512-" + base64.b64encode(digest.digest()).decode("ascii")


def check_tarball(path: Path, expected: str = OHIF_INTEGRITY) -> None:
    """Refuse a tarball over :data:`MAX_TARBALL` or whose SHA-512 is not ``expected``."""
    size = path.stat().st_size
    if size > MAX_TARBALL:
        raise ViewerInstallError(f"{path} is {size} bytes, more than {MAX_TARBALL}: not the viewer")
    found = integrity_of(path)
    if found != expected:
        raise ViewerInstallError(
            f"{path} is not {OHIF_PACKAGE}@{OHIF_VERSION}: its integrity is {found}, "
            f"the pinned one {expected}"
        )


_NPM_NOISE = ("code ", "syscall ", "errno ", "at ", "A complete log", "{", "}", "code:", "errno:")


def _npm_error(stderr: str) -> str:
    """``, CODE): the first line of npm's error that says what went wrong``."""
    lines = [x.removeprefix("npm error").strip() for x in stderr.splitlines()]
    lines = [x for x in lines if x]
    code = next((x.split()[1] for x in lines if x.startswith("code ") and len(x.split()) > 1), "")
    detail = next((x for x in lines if not x.startswith(_NPM_NOISE)), "no message")
    return (f", {code}" if code else "") + f"): {detail[:300]}"


def npm_pack(folder: Path, npm: str = "npm", timeout: float = NPM_TIMEOUT) -> Path:
    """``npm pack @ohif/app@VERSION`` into ``folder`` within ``timeout`` s; the tarball's path.

    Raises
    ------
    NpmUnavailable
        npm is missing or fails (registry unreachable...).
    ViewerInstallError
        npm reports another integrity, or no tarball.
    """
    command = [npm, "pack", f"{OHIF_PACKAGE}@{OHIF_VERSION}", "--json", "--ignore-scripts"]
    command += ["--pack-destination", str(folder)]
    try:
        proc = subprocess.run(
            command,
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise NpmUnavailable(
            f"npm is not installed ({npm!r} not found); install Node.js and npm, or pass "
            "--tarball FILE (the output of npm pack on a machine with the registry)"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise NpmUnavailable(f"npm pack took longer than {timeout:.0f} s") from exc
    if proc.returncode != 0:
        raise NpmUnavailable(f"npm pack failed (exit {proc.returncode}{_npm_error(proc.stderr)}")
    try:
        report = json.loads(proc.stdout)[0]
        name, reported = str(report["filename"]), str(report["integrity"])
    except (ValueError, LookupError, TypeError) as exc:
        raise ViewerInstallError("npm pack gave no JSON report of the tarball") from exc
    if reported != OHIF_INTEGRITY:
        raise ViewerInstallError(
            f"npm reports integrity {reported} for {OHIF_PACKAGE}@{OHIF_VERSION}, "
            f"the pinned one is {OHIF_INTEGRITY}"
        )
    path = folder / Path(name).name
    if not path.is_file():
        raise ViewerInstallError(f"npm pack did not write {path}")
    return path


def unpack_dist(tarball: Path, dest: Path) -> tuple[int, int]:
    """Unpack ``package/dist/`` of ``tarball`` into ``dest``; (files, bytes) written.

    Every member passes :func:`tarfile.data_filter` under its final name; links, devices and
    anything outside ``package/dist/`` are refused or skipped; the member count and the
    unpacked size are bounded.
    """
    counted = {"files": 0, "bytes": 0, "members": 0}

    def keep(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
        counted["members"] += 1
        if counted["members"] > MAX_MEMBERS:
            raise ViewerInstallError(f"the tarball has more than {MAX_MEMBERS} members")
        if not member.name.startswith(_DIST) or member.name == _DIST.rstrip("/"):
            return None
        if not (member.isfile() or member.isdir()):
            raise ViewerInstallError(f"{member.name}: not a regular file or folder, refused")
        renamed = member.replace(name=member.name[len(_DIST) :], deep=False)
        filtered = tarfile.data_filter(renamed, path)
        if filtered.isfile():
            counted["files"] += 1
            counted["bytes"] += filtered.size
            if counted["bytes"] > MAX_UNPACKED:
                raise ViewerInstallError(f"the viewer unpacks to more than {MAX_UNPACKED} bytes")
        return filtered

    try:
        with tarfile.open(tarball, "r:gz") as archive:
            archive.extractall(dest, filter=keep)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ViewerInstallError(f"{tarball} cannot be unpacked: {exc}") from exc
    if not (dest / "index.html").is_file():
        raise ViewerInstallError(f"{tarball} has no package/dist/index.html: not a viewer build")
    return counted["files"], counted["bytes"]


def _replace(path: Path, old: str, new: str, *, count: int | None = None) -> None:
    text = path.read_text(encoding="utf-8")
    found = text.count(old)
    if found == 0 or (count is not None and found != count):
        raise ViewerInstallError(
            f"{path.name}: expected {count or 'some'} {old!r}, found {found}: "
            f"not the {OHIF_PACKAGE}@{OHIF_VERSION} build this installer knows"
        )
    path.write_text(text.replace(old, new), encoding="utf-8")


def rebase(dist: Path, base: str = VIEWER_BASE) -> int:
    """Make the build load everything from ``base`` instead of ``/``; bundles rewritten."""
    prefix = base.rstrip("/") + "/"
    index = dist / "index.html"
    _replace(index, _SERVICE_WORKER_TAG, "", count=1)
    _replace(index, 'window.PUBLIC_URL="/"', f'window.PUBLIC_URL="{prefix}"', count=2)
    for attribute in ("href", "src"):
        _replace(index, f'{attribute}="/', f'{attribute}="{prefix}')
    _replace(dist / "manifest.json", '"/assets/', f'"{prefix}assets/')
    bundles = 0
    for script in sorted(dist.glob("*.js")):
        if _WEBPACK_ROOT in script.read_text(encoding="utf-8", errors="replace"):
            _replace(script, _WEBPACK_ROOT, f'__webpack_require__.p = "{prefix}";', count=1)
            bundles += 1
    if bundles == 0:
        raise ViewerInstallError("no webpack runtime names the root: not the build we know")
    styles = [s for s in sorted(dist.glob("*.css")) if "url(/" in s.read_text(encoding="utf-8")]
    if not styles:
        raise ViewerInstallError(
            "no style sheet loads its font from the root: not the build we know"
        )
    for style in styles:  # the icon font: url(/HASH.woff2)
        _replace(style, "url(/", f"url({prefix}")
    return bundles


def app_config(base: str = VIEWER_BASE, dicomweb: str = DICOMWEB_ROOT) -> str:
    """Our ``app-config.js``: one DICOMweb data source, this node, same origin.

    Same origin (``window.location.origin``): the browser sends the token cookie of the pages
    with every request, and no other host is named. Off, as in OHIF's secure default and kept
    off explicitly: ``dangerouslyUseDynamicConfig`` (configuration from ``?configUrl=``), the
    ``?url=`` data sources (``dicomjson``, ``dicomwebproxy``), local files (``dicomlocal``),
    ``?customization=`` loading (no ``customizationUrlPrefixes``), OIDC (the node's own access
    check applies). OHIF's investigational-use notice is shown once and then every 30 days
    (``investigationalUseDialog: configure``): our results are unverified too.
    """
    config = {
        "name": "cxr-triage",
        "routerBasename": base.rstrip("/") or "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 3,
        "showWarningMessageForCrossOrigin": True,
        "showCPUFallbackMessage": True,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "groupEnabledModesFirst": True,
        "allowMultiSelectExport": False,
        "maxNumRequests": {"interaction": 100, "thumbnail": 5, "prefetch": 10},
        "showErrorDetails": "dev",
        "investigationalUseDialog": {"option": "configure", "days": 30},
        "dangerouslyUseDynamicConfig": {"enabled": False, "regex": "^$"},
        "defaultDataSourceName": "cxr-triage",
    }
    config["dataSources"] = [
        {
            "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
            "sourceName": "cxr-triage",
            "configuration": {
                "friendlyName": "cxr-triage node",
                "name": "cxr-triage",
                "qidoSupportsIncludeField": False,
                "imageRendering": "wadors",
                "thumbnailRendering": "thumbnail",
                "thumbnailRequestStrategy": "fetch",
                "enableStudyLazyLoad": True,
                "supportsFuzzyMatching": False,
                "supportsWildcard": False,
                "staticWado": False,
                "singlepart": "bulkdata,video",
                "omitQuotationForMultipartRequest": True,
                "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
            },
        }
    ]
    return f"""/** cxr-triage: by `triage viewer install` ({OHIF_PACKAGE}@{OHIF_VERSION}). */
// One data source: this node's DICOMweb root on the page's own origin.
(function () {{
  var config = {json.dumps(config, indent=2)};
  var root = window.location.origin + {json.dumps(dicomweb)};
  var source = config.dataSources[0].configuration;
  source.qidoRoot = root;
  source.wadoRoot = root;
  source.wadoUriRoot = root;
  config.httpErrorHandler = function (error) {{
    console.warn("DICOMweb request failed", error && error.status);
  }};
  window.config = config;
}})();
"""


def install_viewer(storage: Path, tarball: Path | None = None, npm: str = "npm") -> InstalledViewer:
    """Install the pinned viewer under ``storage`` (see the module docstring).

    Parameters
    ----------
    storage : Path
        The node's storage folder (created when missing).
    tarball : Path, optional
        A local ``ohif-app-3.13.2.tgz`` instead of ``npm pack``; checked the same way.
    npm : str
        The npm command.

    Raises
    ------
    ViewerInstallError
        Anything that stops the install; the installed viewer, if any, is left as it was.
    """
    storage = Path(storage)
    try:
        storage.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".viewer-new-", dir=storage))
    except OSError as exc:
        raise ViewerInstallError(f"storage folder {storage} cannot be written: {exc}") from exc
    try:
        if tarball is None:
            download = work / "npm"
            download.mkdir()
            tarball = npm_pack(download, npm)
        elif not Path(tarball).is_file():
            raise ViewerInstallError(f"tarball {tarball} does not exist")
        check_tarball(Path(tarball))
        dist = work / "viewer" / "dist"
        dist.mkdir(parents=True)
        files, size = unpack_dist(Path(tarball), dist)
        bundles = rebase(dist)
        (dist / "app-config.js").write_text(app_config(), encoding="utf-8")
        record = InstalledViewer(
            OHIF_PACKAGE, OHIF_VERSION, OHIF_INTEGRITY, VIEWER_BASE, files, size, time.time()
        )
        (work / "viewer" / "installed.json").write_text(
            json.dumps(asdict(record), indent=2) + "\n", encoding="utf-8"
        )
        target = viewer_dir(storage)
        old = work / "old"
        if target.exists():
            os.replace(target, old)
        os.replace(work / "viewer", target)
        logger.info(
            "viewer %s@%s installed in %s (%d files, %d bundles rebased to %s)",
            OHIF_PACKAGE,
            OHIF_VERSION,
            target,
            files,
            bundles,
            VIEWER_BASE,
        )
        return record
    except OSError as exc:
        raise ViewerInstallError(f"cannot install the viewer in {storage}: {exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
