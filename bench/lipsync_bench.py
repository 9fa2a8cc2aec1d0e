"""Run the end-to-end benchmark without the CLI (for machines where only PYTHONPATH is set up).

    python3 bench/lipsync_bench.py MODELS_DIR WORK_DIR SECONDS [OUT_JSON [RUNS]]

RUNS: comma-separated, of cold, warm, face_box, silence30 (default all four; silence30 after warm)
and warm_intermediate (after warm: the intermediate encode profile). OUT_JSON is written after
each run and again with the ceilings at the end, so a run cut off by a time limit keeps its rows.
"""

import json
import logging
import sys
from pathlib import Path

from musetalk_service.benchmark import RUNS
from musetalk_service.benchmark.lipsync import render_table, run_lipsync_bench
from musetalk_service.settings import load_settings

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
models, work, seconds = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
out = Path(sys.argv[4]) if len(sys.argv) > 4 else None
runs = tuple(sys.argv[5].split(",")) if len(sys.argv) > 5 else RUNS


def checkpoint(report: dict) -> None:
    if out is not None:
        out.write_text(json.dumps(report, indent=2))


report = run_lipsync_bench(load_settings(models_dir=models), work, seconds=seconds, runs=runs, checkpoint=checkpoint)
print(render_table(report))
