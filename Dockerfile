# Worker (and producer) image for the streaming video segmentation service.
#
# Base: python:3.11-slim, not an nvidia/cuda image. The PyPI torch wheels bundle their own CUDA runtime,
# cuDNN and NCCL (the nvidia-* pip packages), so the image only needs the host's NVIDIA driver, which the
# NVIDIA Container Toolkit mounts in at run time (compose: deploy.resources.reservations.devices).
# An nvidia/cuda base would ship a second, unused copy of the CUDA libraries and no Python 3.11.
# torch 2.14.1 from PyPI is built for CUDA 13.0 and needs a host driver >= 580; on an older driver build
# with a matching wheel index, e.g.
#     docker compose build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
#
# Checkpoints are not baked in: the worker downloads the preset's file into /checkpoints (a named volume)
# on first start, or put it there by hand (see worker/checkpoints.py for the exact commands).

FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://pypi.org/simple

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    STORAGE_ROOT=/storage \
    VSEG_CHECKPOINT_DIR=/checkpoints \
    HF_HOME=/checkpoints/.hf

# opencv-python (not -headless) needs libGL and glib at import time; PyAV's wheels bundle FFmpeg.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

# torch first: sam2's sdist imports torch at build time, so it is built without build isolation.
# SAM2_BUILD_CUDA=0 skips the optional connected-components CUDA extension (only used for hole filling;
# sam2 falls back without it), so no compiler or CUDA toolkit is needed here.
RUN pip install --index-url "$TORCH_INDEX_URL" torch==2.14.1 torchvision==0.29.1 \
    && pip install setuptools wheel \
    && SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2==1.1.0

WORKDIR /app

# The rest of the dependencies, in their own layer so that code edits do not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY . .
RUN pip install --no-deps . \
    && useradd --create-home --uid 1000 vseg \
    && mkdir -p /storage /checkpoints \
    && chown vseg:vseg /storage /checkpoints

# Named volumes mounted here start out owned by vseg (Docker copies the mount point's ownership).
USER vseg

CMD ["python", "-m", "worker"]
