"""Time from process start to a loaded, warmed (compiled) pipeline, as `serve` does before /ready.

    python3 bench/ready_bench.py MODELS_DIR [OUT_JSON]

Run it after a benchmark has filled the compile cache to measure a restart with a warm cache.
"""

import time

started = time.perf_counter()

import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from musetalk_service.pipeline.runner import LipsyncPipeline  # noqa: E402
from musetalk_service.settings import load_settings  # noqa: E402

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
imported = time.perf_counter() - started
settings = load_settings(models_dir=Path(sys.argv[1]))
LipsyncPipeline.load(settings)
report = {
    "process_start_to_ready_s": round(time.perf_counter() - started, 2),
    "imports_s": round(imported, 2),
    "compile": settings.compile.model_dump(mode="json"),
}
print(json.dumps(report))
if len(sys.argv) > 2:
    Path(sys.argv[2]).write_text(json.dumps(report, indent=2))
