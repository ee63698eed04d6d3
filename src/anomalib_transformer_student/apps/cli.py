"""The ``transformer-student`` command line: one sub-command per job, each in its own module.

A sub-command is a module with two functions, ``add_arguments(parser)`` and
``run(args) -> int`` (the exit code), registered by one line in :data:`COMMANDS`. Only the
chosen sub-command's module is imported, so that one job's imports never slow down another.

Example:
    From a shell (``python -m anomalib_transformer_student.apps.cli`` works as well)::

        transformer-student demo --categories brick --epochs 3 --output demo_output
"""

from __future__ import annotations

import argparse
import importlib
import sys
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
)


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """Build the parser: every sub-command listed, the options of ``selected`` (if any) added."""
    parser = argparse.ArgumentParser(
        prog="transformer-student",
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


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the chosen sub-command, return its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    names = {command.name for command in COMMANDS}
    selected = next((argument for argument in argv if argument in names), None)
    args = build_parser(selected).parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
