# vlserve, CPU image: the README's install (torch from PyTorch's CPU wheel index, so the
# image carries no CUDA libraries). Build:   docker build -t vlserve:cpu .
# Run:  docker run -p 8000:8000 -v /path/to/model:/model vlserve:cpu --model /model
#
# CUDA variant (see README, "Operations"): build FROM an nvidia/cuda runtime image with
# python3.11, and install torch from PyPI's default wheels (they bundle CUDA):
#   docker build --build-arg TORCH_INDEX=https://pypi.org/simple -t vlserve:cuda .
# then run with `--gpus all` and `--device cuda`.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY server ./server
COPY vl ./vl
COPY engine ./engine
RUN pip install . && useradd --create-home --uid 10001 vlserve

USER vlserve
EXPOSE 8000
# Kubernetes: drain-grace and drain-timeout must fit in terminationGracePeriodSeconds
# (deploy/kubernetes/deployment.yaml).
ENTRYPOINT ["vlserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--drain-grace", "10", "--drain-timeout", "30"]
