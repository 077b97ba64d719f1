# The serving image: `nextserve router` and `nextserve worker` (one image for both).
# Build from the repository root and push it where your nodes pull from (docs/operator.md):
#   docker build -t REGISTRY/nextserve:0.1.0 . && docker push REGISTRY/nextserve:0.1.0
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

WORKDIR /src
COPY . .
# Exactly the versions CI tested (deploy/constraints.txt; torch: the CUDA build of that release).
RUN pip install --upgrade pip \
 && pip install -c deploy/constraints.txt . \
 && rm -rf /src

# The pods run as this user (the operator sets runAsUser 1000 and a read-only root).
RUN useradd --uid 1000 --create-home --shell /usr/sbin/nologin nextserve
USER 1000
WORKDIR /tmp
ENTRYPOINT ["nextserve"]
