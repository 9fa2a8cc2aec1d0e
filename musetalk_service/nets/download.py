"""Fetch the official weights into the layout, and record what was fetched.

Hub files go through `huggingface_hub.hf_hub_download` with `local_dir`, so they land directly at
their layout path (no second copy in the hub cache). HF_ENDPOINT (a mirror) and HF_TOKEN are
honoured by huggingface_hub itself; an interrupted download resumes, and a complete one is not
fetched again (huggingface_hub keeps its metadata under `<dir>/**/.cache/huggingface/`).
The one file that no hub repo hosts (`WeightFile.url`) is fetched over plain HTTPS.

PROVENANCE.json then records {"kind": "official", "files": {relpath: {size, sha256, source}}}, which
`check.weights_kind` uses to tell official weights from files changed since.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from huggingface_hub import hf_hub_download

from musetalk_service.nets.layout import PROVENANCE_FILE, WEIGHT_FILES, WeightFile

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20


def download_weights(models_dir: str | Path, files: Iterable[WeightFile] = WEIGHT_FILES) -> Path:
    """Download every layout file (or just `files`) into `models_dir` and write PROVENANCE.json.

    Returns the folder. Network and hub errors propagate from huggingface_hub / urllib unchanged
    (they name the repo, file and HTTP status).
    """
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    # Dropped first and written last: a download that fails half-way leaves the folder "custom".
    (models_dir / PROVENANCE_FILE).unlink(missing_ok=True)
    record = {}
    for entry in files:
        target = entry.path(models_dir)
        if entry.repo_id is not None:
            source = f"hf://{entry.repo_id}/{entry.filename}"
            _from_hub(entry, models_dir)
        else:
            source = entry.url
            _from_url(entry.url, target)
        record[entry.relpath] = {"size": target.stat().st_size, "sha256": _sha256(target), "source": source}
        logger.info("%s: %d bytes from %s", entry.relpath, record[entry.relpath]["size"], source)
    provenance = {"kind": "official", "files": record}
    (models_dir / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    return models_dir


def _from_hub(entry: WeightFile, models_dir: Path) -> None:
    # hf_hub_download puts `filename` (which may contain folders) under local_dir; choose local_dir
    # so that this is exactly the layout path.
    if not (entry.relpath == entry.filename or entry.relpath.endswith("/" + entry.filename)):
        raise ValueError(f"layout path {entry.relpath} does not end with the hub file name {entry.filename}")
    local_dir = models_dir / entry.relpath[: len(entry.relpath) - len(entry.filename)]
    hf_hub_download(repo_id=entry.repo_id, filename=entry.filename, local_dir=local_dir)


def _from_url(url: str, target: Path) -> None:
    if target.is_file():
        logger.info("%s already present, not fetched again from %s", target, url)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
        shutil.copyfileobj(response, out, _CHUNK)
    # Renamed only when complete: an interrupted download never sits under the real name.
    os.replace(partial, target)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
