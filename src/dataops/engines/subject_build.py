"""A subject layout's build, run in a child process under a memory cap.

`dataops.engines.subject.SubjectLayouts` runs ``python -m dataops.engines.subject_build``
for a dataset past `subject.CHILD_ROWS` rows, with the request on stdin (JSON): the
catalog entry the server holds (path, sandbox and terms), the columns the products
read, the fingerprint, the state and target directories, and the memory cap. The child
caps its memory before it imports polars, loads the entry again and refuses one
that changed since the server loaded it, lays the dataset out where the server will
read it, and prints its stats as one line of JSON. Why a child: see
`dataops.tables.build` (the build's pages go when it exits; past its cap it fails alone).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from dataops.engines.children import child_main


def build(request: dict) -> dict:
    from dataops.engines.build import peak
    from dataops.engines.children import entry_again
    from dataops.engines.subject import SubjectLayouts
    from dataops.versions import Fingerprints

    started = time.monotonic()
    dataset = entry_again(request)
    layouts = SubjectLayouts(Path(request["state"]), (), Fingerprints())
    layouts.columns[dataset.id] = tuple(request["columns"])
    layouts._lay_out(dataset, request["fingerprint"], Path(request["directory"]))
    return {"seconds": round(time.monotonic() - started, 3), "peak_rss_bytes": peak("VmHWM")}


def main() -> int:
    return child_main(build, "layout")


if __name__ == "__main__":
    sys.exit(main())
