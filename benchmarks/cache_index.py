r"""Cost of adding an entry to a spill file (budget check included), and of a reader taking in the new lines.

Each entry is listed by appending one line to the file's index, and checked against the folder-wide disk budget
under the budget lock, so the time per entry should be flat from the 1,000th to the 50,000th. Small float16
entries (2 x 16 x 8) make the index, not the data, the cost under test; a reader refreshes after every 1,000.

    python benchmarks/cache_index.py                    # 50,000 entries
    python benchmarks/cache_index.py --entries 200000
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from common import cpu_summary, markdown_row, markdown_rule

from anomalib_transformer_student.feature_cache.run_folder import CacheRoot
from anomalib_transformer_student.feature_cache.spill_file import SpillFile
from anomalib_transformer_student.feature_cache.store import FeatureStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=50_000)
    parser.add_argument("--window", type=int, default=1_000, help="Entries timed together around each mark.")
    args = parser.parse_args()

    entry = torch.zeros(2, 16, 8)
    with tempfile.TemporaryDirectory() as folder:
        root = CacheRoot(folder)
        writer = FeatureStore(root, root.create_run({"purpose": "benchmark"}), memory_budget_mb=0)
        reader = SpillFile(writer.folder, 0, "float16")
        put_ms: dict[int, float] = {}
        refresh_ms: dict[int, float] = {}
        started = time.perf_counter()
        for number in range(1, args.entries + 1):
            writer.put(f"{number:032x}", entry)
            if number % args.window == 0:
                now = time.perf_counter()
                put_ms[number] = (now - started) / args.window * 1e3
                reader.refresh()
                refresh_ms[number] = (time.perf_counter() - now) * 1e3
                started = time.perf_counter()
        assert len(reader.entries) == args.entries
        index_mb = (writer.folder.path / "rank0.log").stat().st_size / 2**20
        reader.close()
        writer.close()

    print(f"CPU: {cpu_summary()}")
    print(f"Index of {args.entries} entries: {index_mb:.1f} MB\n")
    print(markdown_row(["entries so far", f"ms per entry (mean of {args.window})", "reader refresh, ms"]))
    print(markdown_rule("rrr"))
    marks = sorted({args.window, 10_000, 25_000, args.entries} & set(put_ms))
    for mark in marks:
        print(markdown_row([f"{mark:,}", f"{put_ms[mark]:.3f}", f"{refresh_ms[mark]:.2f}"]))


if __name__ == "__main__":
    main()
