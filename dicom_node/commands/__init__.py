"""The ``triage`` subcommands of the node: one thin module per command, over library calls.

Each command module (:mod:`serve`, :mod:`worker`, :mod:`worklist`, :mod:`predict`, :mod:`token`,
:mod:`feedback`) exposes ``add_arguments(parser)`` and ``run(args) -> int`` for
:mod:`dicom_node.cli`, and imports its heavy stack inside ``run``. What they share is in
:mod:`common` (flags, settings, opening the worklist, a node's life); command modules never
import each other. :mod:`feedback_export` is the work behind ``triage feedback export``
(imported by that command when it runs, so NumPy is not loaded at parse time).
"""

from dicom_node.commands import common, feedback, predict, serve, token, worker, worklist

__all__ = ["common", "feedback", "predict", "serve", "token", "worker", "worklist"]
