"""Command: merge fxpsweep results into the bits-vs-accuracy table (CSV, Markdown, PNG).

    python -m fxpsweep.aggregate SWEEP_DIR [SWEEP_DIR ...] [--out DIR] [--readme FILE --marker NAME]

See ``fxpsweep.sweep.aggregate`` for how results are merged.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fxpsweep.core.errors import ConfigError
from fxpsweep.sweep.aggregate import load_results, replace_between_markers, write_tables
from fxpsweep.sweep.config import Folder
from fxpsweep.core.storage import atomic_write_text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Merge fxpsweep results into the bits-vs-accuracy table and plot.")
    parser.add_argument("sweep_dirs", nargs="+", type=Path, help="folders holding job results (searched recursively)")
    parser.add_argument("--out", type=Path, help="where to write the CSV, Markdown and PNG (default: the first folder)")
    parser.add_argument("--readme", type=Path, help="a Markdown file whose table between markers is rewritten")
    parser.add_argument("--marker", help="the marker name: the table goes between <!-- NAME --> and <!-- /NAME -->")
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.sweep_dirs if not d.is_dir()]
    if missing:
        parser.error(f"not a folder: {', '.join(missing)}")
    if (args.readme is None) != (args.marker is None):
        parser.error("--readme and --marker go together")
    readme = None
    try:
        if args.readme is not None:  # checked before anything is written
            readme = args.readme.read_text()
            replace_between_markers(readme, args.marker, "")
        Folder(writable=True)("--out", str(args.out or args.sweep_dirs[0]))
    except (OSError, ValueError) as err:
        parser.error(f"--readme {args.readme}: {getattr(err, 'strerror', None) or err}")
    except ConfigError as err:
        parser.error(str(err))
    results = load_results(args.sweep_dirs)
    if results.empty:
        parser.error(f"no job folders (result.json, error.json or job.json) under {', '.join(map(str, args.sweep_dirs))}; "
                     "give the folder a run or sweep wrote")
    table = write_tables(args.sweep_dirs, args.out or args.sweep_dirs[0])
    markdown = table.to_markdown(index=False) if not table.empty else "no results found"
    print(markdown)
    if readme is not None:
        atomic_write_text(args.readme, replace_between_markers(readme, args.marker, markdown))
        print(f"rewrote the {args.marker!r} table in {args.readme}")
    failed = int((results.status != "done").sum())
    if failed:
        print(f"{failed} job(s) failed, did not finish or have a damaged result.json: see their folders' error.json "
              "(or job.json alone); a rerun of the sweep runs them again")


if __name__ == "__main__":
    main()
