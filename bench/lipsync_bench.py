"""Run the end-to-end benchmark without the CLI (for machines where only PYTHONPATH is set up).

    python3 bench/lipsync_bench.py MODELS_DIR WORK_DIR SECONDS [OUT_JSON [RUNS]]

RUNS: comma-separated, of cold, warm, face_box, silence30 (default all four; silence30 after warm).
"""

import json
import logging
import sys
from pathlib import Path

from musetalk_service.benchmark.lipsync import RUNS, render_table, run_lipsync_bench
from musetalk_service.settings import load_settings

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
models, work, seconds = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
runs = tuple(sys.argv[5].split(",")) if len(sys.argv) > 5 else RUNS
report = run_lipsync_bench(load_settings(models_dir=models), work, seconds=seconds, runs=runs)
print(render_table(report))
if len(sys.argv) > 4:
    Path(sys.argv[4]).write_text(json.dumps(report, indent=2))
