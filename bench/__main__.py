"""Benchmarks: raylens beside its baseline in the same run, the ratio printed last.

    python -m bench trainer [--json]   steady-state training samples/s: raylens ÷ a bare PyTorch loop
    python -m bench startup [--json]   seconds from `raylens train` start to the first optimizer step
    python -m bench thread [--json]    the raylens loop on a secondary thread ÷ on the main thread
    python -m bench validate [--json]  seconds for `raylens validate` to answer a spec mistake
    python -m bench pipeline [--json]  a model over one worker's memory budget: pipeline x2 ÷ FSDP x2
    python -m bench submit [--json]    `raylens submit` to a local cluster ÷ `raylens run`, launch to end
    python -m bench sweep [--json]     32 one-second trials, 2 at a time: raylens (tracked) ÷ ideal 16 s
    python -m bench asha [--json]      epochs to a target score: ASHA ÷ random search; TPE's trials ÷ random's
    python -m bench selection [--json] one sweep across 5 candidates ÷ tuning the winner alone, and its score
    python -m bench debugger [--json]  training steps/s with the debugger on (defaults; everything) ÷ off
    python -m bench build [--json]     building a 1M x 64 feature set: peak memory ÷ reading it with pyarrow
    python -m bench ingest [--json]    a stored split to torch batches: raylens ÷ a plain pyarrow → torch read
    python -m bench share [--json]     memory 4 concurrent trials add for one split, in copies of it
    python -m bench online [--json]    online store lookups of 1 and 100 entities: raylens ÷ plain sqlite3
    python -m bench serve [--json]     one-row requests/s of raylens serve ÷ mlflow models serve, p50/p99

Figures, with the machine they came from, are kept in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable
from typing import Any

from bench import (
    asha,
    build,
    debugger,
    ingest,
    online,
    pipeline,
    selection,
    serve,
    share,
    startup,
    submit,
    sweep,
    thread,
    trainer,
    validate,
)

BENCHMARKS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "trainer": trainer.run,
    "startup": startup.run,
    "thread": thread.run,
    "validate": validate.run,
    "pipeline": pipeline.run,
    "submit": submit.run,
    "sweep": sweep.run,
    "asha": asha.run,
    "selection": selection.run,
    "debugger": debugger.run,
    "online": online.run,
    "build": build.run,
    "ingest": ingest.run,
    "share": share.run,
    "serve": serve.run,
}


def machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("name", choices=sorted(BENCHMARKS))
    parser.add_argument("--json", action="store_true", help="print one JSON object (ratio is its last key)")
    parser.add_argument("--quick", action="store_true", help="a smaller workload, to check the harness runs")
    args = parser.parse_args(argv)
    result = {"benchmark": args.name, "machine": machine(), **BENCHMARKS[args.name](args)}
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
