"""``transformer-student cache``: see and clear the teacher-feature cache folder.

Each run works in its own folder inside the cache folder and removes it when it ends; a folder left behind
is one of a killed run (the next run removes it too). ``cache list`` shows every folder with its size, purpose,
creation time and whether a running process uses it; ``cache clear`` removes the unused ones (all, or those
created more than ``--older-than`` days ago). Neither creates anything or changes a permission, and both refuse
(one line, exit 2) a folder that holds anything but the cache's own.

Example:
    From a shell::

        transformer-student cache list
        transformer-student cache clear --older-than 1
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

from ..feature_cache.run_folder import CacheRoot, FolderUsage
from ..feature_cache.settings import default_cache_dir

ACTIONS = ("list", "clear")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the cache command."""
    parser.add_argument("action", choices=ACTIONS, help="list: sizes and use; clear: remove unused folders.")
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
        help="clear: remove only folders created this many days ago or earlier (default: all unused).",
    )


def describe(usage: FolderUsage) -> str:
    """One line of ``cache list``: name, size, creation time, in use, purpose.

    Example:
        >>> describe(FolderUsage("tsfc-0123456789abcdef", 3 * 2**20, {"created": 0, "purpose": "training"}, False))
        'tsfc-0123456789abcdef        3.0 1970-01-01 00:00 UTC  unused   training'
    """
    about = usage.about or {}
    created = about.get("created")
    when = "?" if created is None else datetime.datetime.fromtimestamp(created, tz=datetime.timezone.utc)
    when = when if isinstance(when, str) else when.strftime("%Y-%m-%d %H:%M UTC")
    state = "in use" if usage.in_use else "unused"
    what = about.get("purpose", "unrecognised (no record): left alone") if usage.about else "unrecognised: left alone"
    return f"{usage.name:22} {usage.bytes / 2**20:9.1f} {when:20}  {state:7}  {what}"


def run(args: argparse.Namespace) -> int:
    """List or clear the cache folder; 0 on success."""
    if args.older_than is not None and (args.action != "clear" or args.older_than < 0):
        msg = "--older-than takes a number of days >= 0 and applies to `cache clear` only."
        raise ValueError(msg)
    directory = Path(args.cache_dir or default_cache_dir()).expanduser()
    if not directory.exists() and not directory.is_symlink():
        print(f"No teacher-feature cache at {directory}.")
        return 0
    root = CacheRoot(directory, create=False)
    try:
        if args.action == "list":
            usages = root.usage()
            total = sum(usage.bytes for usage in usages) / 2**20
            print(f"Teacher-feature cache {directory}: {total:.1f} MB in {len(usages)} folders")
            for usage in usages:
                print(describe(usage))
        else:
            limit = None if args.older_than is None else time.time() - args.older_than * 86400
            removed = root.sweep(limit)
            kept = root.usage()
            print(
                f"Removed {len(removed)} folders from {directory}; {len(kept)} kept "
                f"({sum(u.bytes for u in kept) / 2**20:.1f} MB: in use, newer, or not the cache's)."
            )
    finally:
        root.close()
    return 0
