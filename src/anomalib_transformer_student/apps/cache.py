"""``transformer-student cache``: see and clear the teacher-feature cache folder.

``cache list`` shows each fingerprint folder (one teacher, weights, image size, layers, dtype and
pre-processing) with its size, what it holds and when it was last used, least recently used first,
and whether a running process has it open. ``cache clear`` removes the folders no process uses, all
of them or those unused for ``--older-than`` days. Both are safe while trainings use the folder: a
folder in use is skipped, and one being opened while it is removed is opened afresh by its process.

Example:
    From a shell::

        transformer-student cache list
        transformer-student cache clear --older-than 30
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

from ..training.cache_folder import CacheRoot, FingerprintUsage, default_cache_dir

ACTIONS = ("list", "clear")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the cache command."""
    parser.add_argument("action", choices=ACTIONS, help="list: sizes and last use; clear: remove unused features.")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"The cache folder (the model's feature_cache.dir); default {default_cache_dir()}.",
    )
    parser.add_argument(
        "--older-than",
        type=float,
        default=None,
        metavar="DAYS",
        help="clear: remove only features unused for this many days (default: all unused).",
    )
    parser.add_argument(
        "--shared",
        action="store_true",
        help="The folder is shared by a group of users or nodes (the model's feature_cache.shared).",
    )


def describe(usage: FingerprintUsage) -> str:
    """One line of ``cache list``: name, size, last use, in use, and what the features are.

    Example:
        >>> usage = FingerprintUsage("0123456789abcdef", 3 * 2**20, 0.0, {"teacher": "vit", "image_size": 224})
        >>> describe(usage).split()[:3]
        ['0123456789abcdef', '3.0', '1970-01-01']
    """
    about = usage.about
    what = ", ".join(
        f"{key} {about[key]}" for key in ("purpose", "teacher", "image_size", "layers", "dtype") if key in about
    )
    if "tiling" in about:
        what += ", tiled"
    when = datetime.datetime.fromtimestamp(usage.last_used, tz=datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    state = {True: "in use", False: "unused", None: "?"}[usage.in_use]
    return f"{usage.name} {usage.megabytes:10.1f} {when} UTC  {state:7}  {what or 'unknown features'}"


def run(args: argparse.Namespace) -> int:
    """List or clear the cache folder; 0 on success."""
    if args.older_than is not None and (args.action != "clear" or args.older_than < 0):
        msg = "--older-than takes a number of days >= 0 and applies to `cache clear` only."
        raise ValueError(msg)
    directory = Path(args.cache_dir or default_cache_dir()).expanduser()
    if not directory.is_dir():
        print(f"No teacher-feature cache at {directory}.")
        return 0
    root = CacheRoot(directory, shared=args.shared)
    try:
        if args.action == "list":
            usages = root.usage(check_in_use=True)
            total = sum(usage.bytes for usage in usages) / 2**20
            print(f"Teacher-feature cache {directory}: {total:.1f} MB in {len(usages)} folders")
            print(f"{'folder':16} {'MB':>10} {'last used':20}  {'state':7}  features")
            for usage in usages:
                print(describe(usage))
        else:
            removed = root.clear(args.older_than)
            kept = root.usage()
            print(
                f"Removed {len(removed)} folders from {directory}; {len(kept)} kept "
                f"({sum(u.bytes for u in kept) / 2**20:.1f} MB: in use, or used more recently)."
            )
    finally:
        root.close()
    return 0
