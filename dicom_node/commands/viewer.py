"""``triage viewer install [--storage DIR] [--tarball FILE]``: OHIF at ``/viewer/`` of the node.

Fetches the pinned ``@ohif/app`` build through npm (or takes the tarball ``npm pack`` made on
another machine), checks its SHA-512 against the pinned one, unpacks its ``dist/`` into the
storage folder and writes its configuration: the node's own ``/dicomweb`` as the only data
source (:mod:`dicom_node.web.viewer_install`). A running ``triage serve`` on that storage folder
serves it at once; nothing else changes.

Exit status: 0 installed, 1 when it cannot be fetched, checked or unpacked, 2 for invalid
arguments or settings.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dicom_node.commands.common import EXIT_CONFIG
from triage_core.errors import CommandError, ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare ``install``."""
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    install = sub.add_parser(
        "install", help="fetch the pinned OHIF viewer from npm and serve it at /viewer/"
    )
    install.add_argument("--config", type=Path, help="settings TOML (as for triage serve)")
    install.add_argument("--storage", type=Path, help="storage folder of the node")
    install.add_argument(
        "--tarball",
        type=Path,
        metavar="FILE",
        help="a local ohif-app-VERSION.tgz (from npm pack elsewhere) instead of the registry",
    )
    install.add_argument("--npm", default="npm", help="the npm command (default: npm)")


def run(args: argparse.Namespace) -> int:
    """Install the viewer; see the module docstring for the exit status."""
    from dicom_node.settings import load_settings
    from dicom_node.web.viewer_install import ViewerInstallError, install_viewer, viewer_dir

    try:
        settings = load_settings(args.config, {"storage": args.storage})
    except ConfigError as exc:
        raise CommandError(str(exc), EXIT_CONFIG) from exc
    try:
        found = install_viewer(settings.storage, args.tarball, args.npm)
    except ViewerInstallError as exc:
        raise CommandError(str(exc)) from exc
    print(
        f"installed {found.package}@{found.version} ({found.files} files, integrity checked) in "
        f"{viewer_dir(settings.storage).resolve()}; triage serve --storage {settings.storage} "
        f"serves it at {found.base}/"
    )
    return 0
