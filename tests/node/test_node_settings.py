"""NodeSettings: TOML < TRIAGE_* environment < flags, validation with clear ConfigErrors, the
example deploy/triage.toml, and `triage serve` exiting 2 on invalid settings."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
from test_node_support import free_port, triage_command

from dicom_node.preflight import (
    check_database,
    check_model,
    check_port,
    check_runtime,
    check_storage,
)
from dicom_node.settings import AllowedPeer, Destination, NodeSettings, load_settings
from triage_core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("TRIAGE_"):
            monkeypatch.delenv(key)


def test_precedence_toml_env_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "t.toml"
    toml.write_text(
        'ae_title = "FROM_TOML"\nport = 104\nworkers = 3\nstable_age = 9.5\n'
        'destinations = ["A@h1:1"]\n'
    )
    monkeypatch.setenv("TRIAGE_PORT", "2000")
    monkeypatch.setenv("TRIAGE_WORKERS", "4")
    monkeypatch.setenv("TRIAGE_DESTINATIONS", "B@h2:2,C@[::1]:3")
    s = load_settings(toml, {"workers": 5, "ae_title": None})
    assert s.ae_title == "FROM_TOML"  # only in TOML (flag not given)
    assert s.stable_age == 9.5
    assert s.port == 2000  # env beats TOML
    assert s.workers == 5  # flag beats env
    assert s.destinations == [
        Destination(ae_title="B", host="h2", port=2),
        Destination(ae_title="C", host="::1", port=3),
    ]
    assert isinstance(s, NodeSettings)


def test_triage_table_and_defaults(tmp_path: Path) -> None:
    toml = tmp_path / "t.toml"
    toml.write_text('[triage]\nallow_ae = ["MOD1", "PACS@10.0.0.5"]\n')
    s = load_settings(toml)
    assert s.allow_ae == [
        AllowedPeer(ae_title="MOD1"),
        AllowedPeer(ae_title="PACS", host="10.0.0.5"),
    ]
    assert s.stable_age == 5.0 and s.http_host == "127.0.0.1" and s.log_phi is False
    assert s.database_url.startswith("sqlite") and s.database_url.endswith("worklist.sqlite3")


def test_example_deploy_toml_loads() -> None:
    s = load_settings(REPO / "deploy" / "triage.toml")
    assert s.ae_title == "CXR_TRIAGE" and s.port == 11112
    assert [str(d) for d in s.destinations] == ["PACS@pacs.example.org:104"]
    assert [str(p) for p in s.allow_ae] == ["MODALITY1", "PACS@pacs.example.org"]
    assert s.storage == Path("/var/lib/cxr-triage")


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"port": 70000}, "port"),
        ({"port": 0}, "port"),
        ({"destinations": ["no-port@host"]}, "AE@HOST:PORT"),
        ({"ae_title": "A" * 17}, "ae_title"),
        ({"allow_ae": ["BAD\\AE"]}, "allow_ae"),
        ({"db": "not a url"}, "SQLAlchemy URL"),
        ({"stable_age": -1}, "stable_age"),
        ({"workers": -1}, "workers"),
        ({"sc_max_side": 10}, "sc_max_side: must be 0"),
    ],
)
def test_invalid_values_name_the_setting(overrides: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_settings(None, overrides)


def test_bad_toml_and_unknown_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("port = = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("prot = 104\n")
    with pytest.raises(ConfigError, match="prot"):
        load_settings(unknown)
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")


def test_bad_env_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRIAGE_PORT", "eleven")
    with pytest.raises(ConfigError, match="port"):
        load_settings()


def test_runtime_checks(tmp_path: Path, tiny_checkpoint: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="not writable"):
        check_storage(blocker / "storage")
    check_storage(tmp_path / "ok")
    assert (tmp_path / "ok" / "spool").is_dir()

    with pytest.raises(ConfigError, match="missing file"):
        check_model(tmp_path / "nothing")
    assert check_model(tiny_checkpoint) == tiny_checkpoint
    assert check_model(tiny_checkpoint.with_suffix(".json")) == tiny_checkpoint

    closed = free_port()
    with pytest.raises(ConfigError, match="unreachable"):
        check_database(f"postgresql+psycopg://nobody@127.0.0.1:{closed}/none?connect_timeout=2")
    check_database(f"sqlite+pysqlite:///{tmp_path / 'x.sqlite3'}")

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(ConfigError, match="cannot be used"):
            check_port("127.0.0.1", busy.getsockname()[1], "DICOM port")

    settings = load_settings(
        None,
        {
            "storage": tmp_path / "st",
            "model": tiny_checkpoint,
            "port": free_port(),
            "bind_address": "127.0.0.1",
            "http_port": 0,
        },
    )
    assert check_runtime(settings) == tiny_checkpoint


def test_serve_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            *triage_command(),
            "serve",
            "--storage",
            str(tmp_path / "st"),
            "--model",
            str(tmp_path / "missing-model"),
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "missing-model" in proc.stderr and "error" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run(
        [*triage_command(), "serve", "--port", "70000"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2 and "port" in proc.stderr
