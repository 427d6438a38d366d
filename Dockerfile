# The warmcast image: the Airflow 3 components (api-server, scheduler, dag-processor, triggerer,
# Celery worker), the warmcast command and the DAGs. docker-compose.yml builds and runs it; see the
# README's "Production stack (docker compose)".
FROM python:3.11-slim

# torch is pinned by constraints.txt (torch==2.13.0, the CPU build the dev venv uses). On PyPI the
# Linux torch wheel is the CUDA one (several GB of nvidia-* wheels), so the CPU wheel index is
# added for this install; the pin matches its 2.13.0+cpu (a local version label). On a GPU host
# build with a CUDA index instead (docker-compose.yml's airflow-worker-gpu does), e.g.
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# and Lightning's accelerator="auto" trains on the GPU.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    AIRFLOW_HOME=/opt/airflow

RUN groupadd --gid 50000 warmcast \
    && useradd --uid 50000 --gid warmcast --create-home --shell /bin/bash warmcast

WORKDIR /opt/warmcast

# A C compiler for models/native.c, CPU training's fused element-wise kernels, compiled on first use for
# the CPU it runs on (into the user's ~/.cache/warmcast/native); without one, training computes the
# same values in torch, about 1.5x slower (README, "What works today").
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# The project, installed the way the Makefile does it (pip install -c constraints.txt), but not
# editable and without the dev extra; moto[server] (a dev dependency, pinned by the same
# constraints) is added for `warmcast aws local-endpoint`, the demo AWS endpoint.
COPY pyproject.toml README.md constraints.txt ./
COPY pipeline/ pipeline/
COPY models/ models/
COPY scaler/ scaler/
RUN pip install --upgrade pip \
    && pip install -c constraints.txt --extra-index-url "${TORCH_INDEX_URL}" . "moto[server]"

# The Celery executor lives in apache-airflow-providers-celery, which is not a warmcast dependency
# (the embedded `make airflow` runs LocalExecutor) and not in the dev venv: it is installed in this
# image only, pinned to the versions that resolve against constraints.txt
# (`pip install --dry-run -c constraints.txt apache-airflow-providers-celery==3.26.0` picks
# celery 5.6.3, kombu 5.6.2, redis 6.4.0, flower 2.2.0).
RUN pip install -c constraints.txt "apache-airflow-providers-celery==3.26.0" "redis==6.4.0"

COPY dags/ /opt/warmcast/dags/
COPY deploy/entrypoint.sh /usr/local/bin/warmcast-entrypoint
# The mount points of the named volumes (compose copies this ownership into a new volume), and a
# writable var/ for `warmcast demo` run from WORKDIR.
RUN chmod 0755 /usr/local/bin/warmcast-entrypoint \
    && mkdir -p /opt/warmcast/var/lake /opt/warmcast/var/landing /opt/airflow/logs /opt/airflow/auth \
    && chown -R warmcast:warmcast /opt/warmcast/var /opt/airflow

USER warmcast
ENTRYPOINT ["/usr/local/bin/warmcast-entrypoint"]
CMD ["version"]
