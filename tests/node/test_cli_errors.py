"""The one error path of the ``triage`` commands: ``CommandError`` and argparse types.

A command raises :class:`~triage_core.errors.CommandError`; :func:`dicom_node.cli.main` prints
exactly one ``triage CMD: error: ...`` line (the traceback only at ``-vv``) and returns the
error's status. Arguments with a grammar are checked by their argparse ``type=``: argparse's
usage line, its ``error:`` line naming the argument, exit status 2.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node import cli
from dicom_node.commands import common
from triage_core.errors import CommandError
from triage_core.worklist import Worklist


@pytest.fixture(autouse=True)
def _default_log_levels() -> Iterator[None]:
    """The levels a fresh ``triage`` process starts with (a node run in this process before
    sets ``dicom_node`` and ``triage_core`` to INFO: its INFO lines would reach stderr)."""
    names = ("dicom_node", "triage_core")
    saved = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.NOTSET)
    yield
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


def test_command_error_prints_one_line_and_returns_its_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "none"
    assert cli.main(["worklist", "--storage", str(missing)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith("triage worklist: error: no worklist at ")
    assert not missing.exists()


def test_command_error_names_the_action_and_keeps_the_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = tmp_path / "storage"
    wl = Worklist(Worklist.sqlite_url(storage))
    wl.create_all()
    wl.dispose()
    assert cli.main(["token", "revoke", "nobody", "--storage", str(storage)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "triage token revoke: error: 'nobody' has no active token"
    ]
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("port = [")
    assert cli.main(["worklist", "--config", str(bad_toml)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("triage worklist: error: ") and "not valid TOML" in line


def test_command_error_status_and_traceback_at_debug(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from dicom_node.commands import worklist

    def fail(args: argparse.Namespace) -> int:
        try:
            raise OSError("disk gone")
        except OSError as exc:
            raise CommandError("cannot read the worklist: disk gone", 3) from exc

    monkeypatch.setattr(worklist, "run", fail)
    monkeypatch.setattr(cli, "configure_logging", lambda verbosity: None)
    with caplog.at_level(logging.DEBUG, logger="dicom_node.cli"):
        assert cli.main(["worklist"]) == 3
    assert (
        capsys.readouterr().err == "triage worklist: error: cannot read the worklist: disk gone\n"
    )
    (record,) = [r for r in caplog.records if r.name == "dicom_node.cli"]
    assert record.levelno == logging.DEBUG and record.exc_info is not None


def test_a_command_error_needs_a_failing_status() -> None:
    with pytest.raises(ValueError, match="non-zero"):
        CommandError("no", 0)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["worklist", "--limit", "0"], "argument --limit: must be at least 1"),
        (["worklist", "--limit", "ten"], "argument --limit: 'ten' is not a whole number"),
        (["worklist", "--study", "1.02"], "argument --study: '1.02' is not a valid DICOM UID"),
        (["worklist", "--study", "1." + "2" * 70], "is not a valid DICOM UID"),
        (["feedback", "list", "--study", "x"], "argument --study: 'x' is not a valid DICOM UID"),
        (
            ["worklist", "--min-priority", "high"],
            "argument --min-priority: 'high' is neither a number nor one of",
        ),
    ],
)
def test_bad_arguments_exit_2_with_argparse_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: triage ")
    assert message in err.splitlines()[-1]


def test_argument_types_accept_good_values() -> None:
    assert common.positive_int("1") == 1 and common.positive_int("1000") == 1000
    assert common.dicom_uid("1.2.840.10008.1.1") == "1.2.840.10008.1.1"
    assert common.priority_floor("urgent") == "urgent"
    assert common.priority_floor("80") == 80.0
    from dicom_node.commands import worklist

    parser = argparse.ArgumentParser()
    worklist.add_arguments(parser)
    args = parser.parse_args(["--limit", "5", "--min-priority", "critical", "--study", "1.2.3"])
    assert (args.limit, args.min_priority, args.study) == (5, "critical", "1.2.3")


def test_only_the_chosen_subcommand_is_imported() -> None:
    """``triage serve`` (a fresh interpreter) imports none of the training stack, and every
    subcommand still parses its own arguments and is listed by ``triage --help``."""
    import json
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "from dicom_node import cli\n"
        "args = cli.build_parser(['serve', '--port', '11112']).parse_args(['serve', '--port', "
        "'11112'])\n"
        "heavy = ('training', 'cv2', 'numpy', 'torch', 'sklearn', 'sqlalchemy', 'pynetdicom')\n"
        "print(json.dumps([args.port, sorted(m for m in heavy if m in sys.modules)]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [11112, []]
    words = ["train", "--cv", "5", "--epochs", "2", "--out", "runs/x"]
    train = cli.build_parser(words).parse_args(words)
    assert (train._module, train.cv, train.epochs) == ("training.cli_train", 5, 2)
    listing = cli.build_parser([]).format_help()
    assert all(name in listing for name in cli.SUBCOMMANDS)
    with pytest.raises(SystemExit):  # an unchosen subcommand has no arguments of its own
        cli.build_parser(["serve"]).parse_args(["train", "--cv", "5"])
