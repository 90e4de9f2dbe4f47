"""Our storage SCP alone in a process, for the fuzz suite (``python fuzz_scp.py PORT STORAGE``).

Prints ``ready`` once listening and runs until its standard input closes. Settings come as
``KEY=VALUE`` arguments after the storage folder (``artim_timeout=1``).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from dicom_node.ingest.spool import StoreContext, make_recorder
from dicom_node.node import open_worklist
from dicom_node.settings import load_settings
from dicom_node.stages.receive import start_scp


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
    port, storage, *pairs = argv
    overrides: dict[str, object] = dict(pair.split("=", 1) for pair in pairs)
    settings = load_settings(
        None,
        {"port": int(port), "bind_address": "127.0.0.1", "storage": Path(storage), **overrides},
    )
    settings.storage.mkdir(parents=True, exist_ok=True)
    worklist = open_worklist(settings)
    store = StoreContext(storage=settings.storage, record=make_recorder(worklist))
    server = start_scp(settings, store)
    print("ready", flush=True)
    sys.stdin.read()
    server.shutdown()
    worklist.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
