"""The ``triage`` command: one console script, one thin module per subcommand.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Only
``argparse`` work happens at parse time; every module imports its heavy stack (torch,
pynetdicom, SQLAlchemy...) inside ``run``. Logging handlers are configured here and nowhere else,
PHI-safe (:mod:`dicom_node.logsafe`: library warnings captured, quoted values redacted) unless
the service's ``--log-phi`` setting says otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from triage_core import __version__
from triage_core.errors import CommandError

logger = logging.getLogger(__name__)

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("dicom_node.commands.serve", "run the DICOM node, scheduler, workers and HTTP API"),
    "worker": ("dicom_node.commands.worker", "run workers only (several machines, one PostgreSQL)"),
    "worklist": ("dicom_node.commands.worklist", "query the priority worklist"),
    "token": (
        "dicom_node.commands.token",
        "HTTP access tokens: add NAME --role ROLE, list, revoke",
    ),
    "feedback": (
        "dicom_node.commands.feedback",
        "readers' verdicts: list, export as a training set",
    ),
    "viewer": (
        "dicom_node.commands.viewer",
        "the OHIF web viewer: install the pinned build, served at /viewer/",
    ),
    "predict": ("dicom_node.commands.predict", "triage DICOM or PNG files from the command line"),
    "train": ("training.cli_train", "train a model on NIH ChestX-ray14"),
    "evaluate": ("training.cli_evaluate", "evaluate a checkpoint: metrics, predictions, plots"),
    "compare": ("training.cli_compare", "compare cross-validation runs made on the same folds"),
}


#: Packages of the ``[train]`` extra: a command that needs one says how to install it.
TRAINING_STACK = frozenset({"torch", "torchvision", "timm", "pytorch_grad_cam", "sklearn", "onnx"})


def chosen_command(argv: Sequence[str] | None = None) -> str | None:
    """The subcommand that ``argv`` (default: ``sys.argv[1:]``) names, or ``None``.

    The global options (``-v``, ``--version``, ``-h``) take no value, so the first word that
    is not an option is the subcommand.
    """
    words = list(sys.argv[1:] if argv is None else argv)
    first = next((word for word in words if not word.startswith("-")), None)
    return first if first in SUBCOMMANDS else None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``triage`` parser for ``argv`` (default: ``sys.argv[1:]``).

    Every subcommand is listed, but only the one that ``argv`` names gets its arguments, so only
    its module is imported: ``triage serve`` does not import the training package (numpy,
    OpenCV and the CV code: about 20 MB of resident memory and a quarter of a second at start).
    """
    chosen = chosen_command(argv)
    parser = argparse.ArgumentParser(
        prog="triage",
        description="cxr-triage: chest X-ray triage as a DICOM node.",
    )
    parser.add_argument("--version", action="version", version=f"cxr-triage {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module_name)
        if name == chosen:
            importlib.import_module(module_name).add_arguments(sub_parser)
    return parser


def configure_logging(verbosity: int) -> None:
    """One stderr handler with the PHI filter, warnings captured (see :mod:`dicom_node.logsafe`)."""
    from dicom_node import logsafe

    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logsafe.install(level)


def command_name(args: argparse.Namespace) -> str:
    """``triage CMD``, with the action of commands that have them (``triage token add``)."""
    action = getattr(args, "action", None)
    return f"triage {args.command}" + (f" {action}" if isinstance(action, str) else "")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    module = importlib.import_module(args._module)
    try:
        result: int = module.run(args)
    except CommandError as exc:
        # the one error path of every subcommand: the cause at -vv, one line for the operator
        name = command_name(args)
        logger.debug("%s failed", name, exc_info=True)
        print(f"{name}: error: {exc}", file=sys.stderr)
        return exc.status
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.partition(".")[0] not in TRAINING_STACK:
            raise
        print(
            f"triage {args.command}: needs the training stack ({exc.name} is not installed): "
            "pip install 'cxr-triage[train]' (the serving commands run without it)",
            file=sys.stderr,
        )
        return 2
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
