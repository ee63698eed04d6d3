"""The ``transformer-student`` command line: one sub-command per job, each in its own module.

A sub-command is a module with two functions, ``add_arguments(parser)`` and
``run(args) -> int`` (the exit code), registered by one line in :data:`COMMANDS`. Only the
chosen sub-command's module is imported, so that one job's imports never slow down another.

A user's error (a bad option, a missing file or folder, unusable data, a checkpoint that cannot be
loaded: see :func:`is_user_error`) ends the command with its message, not a traceback, and exit status 2,
as argparse ends a usage error. Anything else is a defect and keeps its traceback.

Example:
    From a shell (``python -m anomalib_transformer_student.apps.cli`` works as well)::

        transformer-student demo --categories brick --epochs 3 --output demo_output
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """A sub-command: its name, one-line help and the module that implements it.

    Example:
        >>> Command("demo", "Run the demo.", "anomalib_transformer_student.apps.demo").name
        'demo'
    """

    name: str
    help: str
    module: str


PROG = "transformer-student"
# Deprecation notices that anomalib 2.7 and timm print on import, about their own code: not the user's to act on.
THIRD_PARTY_IMPORT_NOTICES = (
    r"Importing from timm\.models\.layers is deprecated",
    r"The anomalib\.models\.components\.dinov2 package is deprecated",
)
# The package's own errors say what is wrong and what to do (each is raised on purpose for the user).
PACKAGE = __name__.split(".")[0]
USER_ERROR_STATUS = 2

COMMANDS: tuple[Command, ...] = (
    Command(
        "demo",
        "Train and test on a generated texture dataset; write metrics.json and predictions.png.",
        "anomalib_transformer_student.apps.demo",
    ),
    Command(
        "evaluate",
        "Test trained checkpoints the paper's way: AUPRO by defect size (CSV, Markdown, PNG).",
        "anomalib_transformer_student.apps.evaluate",
    ),
    Command(
        "cache",
        "See (list) or remove (clear) the teacher-feature cache's folders; safe while trainings run.",
        "anomalib_transformer_student.apps.cache",
    ),
    Command(
        "predict-mvtecad2",
        "Build MVTec AD 2's submission (float16 TIFF maps, PNG masks), check it against MVTec's rules, pack it.",
        "anomalib_transformer_student.apps.mvtecad2_predictions",
    ),
)


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """Build the parser: every sub-command listed, the options of ``selected`` (if any) added."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Learning to Be a Transformer to Pinpoint Anomalies: jobs around the TransformerStudent "
        "anomalib model.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        subparser = subparsers.add_parser(command.name, help=command.help, description=command.help)
        if command.name == selected:
            module = importlib.import_module(command.module)
            module.add_arguments(subparser)
            subparser.set_defaults(handler=module.run)
    return parser


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is the user's to mend: an error of this package, a ``ValueError`` or an ``OSError``.

    Example:
        >>> is_user_error(FileNotFoundError("Checkpoint not found")), is_user_error(KeyError("model"))
        (True, False)
    """
    if isinstance(error, ValueError | OSError):
        return True
    return any(cls.__module__.split(".")[0] == PACKAGE for cls in type(error).__mro__)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the chosen sub-command, return its exit code.

    A user's error (see :func:`is_user_error`) prints ``transformer-student COMMAND: error: MESSAGE`` to
    standard error and returns 2; other exceptions propagate with their traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    for notice in THIRD_PARTY_IMPORT_NOTICES:
        warnings.filterwarnings("ignore", message=notice, category=FutureWarning)
    names = {command.name for command in COMMANDS}
    selected = next((argument for argument in argv if argument in names), None)
    args = build_parser(selected).parse_args(argv)
    try:
        return int(args.handler(args))
    except Exception as error:
        if not is_user_error(error):
            raise
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr, flush=True)
        return USER_ERROR_STATUS


if __name__ == "__main__":
    sys.exit(main())
