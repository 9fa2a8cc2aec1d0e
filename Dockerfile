# musetalk-service on a CUDA host. Weights are not baked in: mount them at /app/models
# (fill the folder with `musetalk-service weights download --dir models` once).
#   docker build -t musetalk-service .
#   docker run --gpus all -p 8000:8000 -v $PWD/models:/app/models \
#     -v musetalk-compile:/root/.cache/musetalk-service musetalk-service
# The second volume keeps torch.compile's kernels: the first start compiles for about 2 minutes,
# later ones load them in seconds.
# Ray Serve mode (README "Running on Ray Serve"), one engine replica per GPU:
#   docker run --gpus all --shm-size=8g -p 8000:8000 -v $PWD/models:/app/models musetalk-service \
#     musetalk-service serve --ray --host 0.0.0.0 --replicas 2
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc ca-certificates \
 && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app

# gcc + python3-dev: Triton (torch.compile on CUDA) builds a small C launcher at first compile.
# torch first and pinned (the PyPI Linux wheel is the CUDA build); ffmpeg comes with imageio-ffmpeg.
RUN pip install torch==2.13.0
COPY pyproject.toml README.md ./
COPY musetalk_service ./musetalk_service
COPY configs ./configs
# With the ray extra, so the image runs either mode.
RUN pip install -e '.[ray]'

ENV MUSETALK_MODELS_DIR=/app/models MUSETALK_HOST=0.0.0.0 MUSETALK_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s \
  CMD python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)" || exit 1
CMD ["musetalk-service", "serve"]
