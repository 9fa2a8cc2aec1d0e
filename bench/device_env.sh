# Source this on the lent GPU machine (no ffmpeg, no package registry there) before a benchmark.
# It installs what the repo's .carry/ folder brought (see docs/benchmarks.md for how to fill it):
#   .carry/whl/*.whl  pure-Python wheels missing there (diffusers, pydantic, pydantic-settings...)
#   .carry/av.tar.xz  PyAV (the probe), unpacked into the same site dir
#   .carry/ffmpeg.xz  a static ffmpeg (imageio-ffmpeg's build), xz-compressed to fit the carry limit
set -e
SITE=/tmp/site
mkdir -p "$SITE"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .carry/whl/*.whl
tar -xJf .carry/av.tar.xz -C "$SITE"
xz -dc .carry/ffmpeg.xz > /tmp/ffmpeg && chmod +x /tmp/ffmpeg
export PYTHONPATH="$SITE:$PWD" MUSETALK_ENCODE__FFMPEG_PATH=/tmp/ffmpeg PYTHONUNBUFFERED=1
set +e
