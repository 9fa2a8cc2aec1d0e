"""Run the face-phase benchmark without the CLI (for machines where only PYTHONPATH is set up).

    python3 bench/face_bench.py MODELS_DIR SECONDS [OUT_JSON]
"""

import json
import logging
import sys
from pathlib import Path

from musetalk_service.benchmark.faces import run_face_bench
from musetalk_service.nets.runtime import load_models
from musetalk_service.settings import load_settings

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
# The bench times S3FD + FAN, so they are loaded whatever face.detector the environment sets.
settings = load_settings(models_dir=Path(sys.argv[1]), face={"detector": "s3fd"})
models = load_models(settings)
report = run_face_bench(models, settings, seconds=float(sys.argv[2]), size=(1920, 1080), fps=25)
print(json.dumps(report, indent=2))
if len(sys.argv) > 3:
    Path(sys.argv[3]).write_text(json.dumps(report, indent=2))
