# Airflow 3.3.2 with the HealthImaging operators, sensor and trigger (and the local endpoint, extra [local]).
# Build: docker compose build   (or: docker build -t airflow-healthimaging:3.3.2 .)
#
# The base image's Python is pinned to the one constraints.txt was resolved and tested on: a bare
# `apache/airflow:3.3.2` takes whatever Python Airflow makes the default of its images. The package itself installs
# on Python 3.11-3.14 (--build-arg PYTHON_VERSION=3.12, ...): tests/test_container_image.py resolves this
# install against each of them without Docker.
ARG AIRFLOW_VERSION=3.3.2
ARG PYTHON_VERSION=3.11
FROM apache/airflow:${AIRFLOW_VERSION}-python${PYTHON_VERSION}

ARG AIRFLOW_VERSION
WORKDIR /opt/airflow-healthimaging
COPY --chown=airflow:0 pyproject.toml constraints.txt README.md ./
COPY --chown=airflow:0 plugins/healthimaging ./plugins/healthimaging
COPY --chown=airflow:0 healthimaging_local ./healthimaging_local
# Pin Airflow so pip never up- or downgrades the image's own Airflow; everything else follows constraints.txt.
# A regular (not editable) install: the code Airflow runs is this copy in site-packages. Rebuild after a change
# (docker compose up -d --build); docker-compose.yaml mounts no plugins folder over it.
RUN pip install --no-cache-dir -c constraints.txt "apache-airflow==${AIRFLOW_VERSION}" ".[local]" \
    && mkdir -p /home/airflow/healthimaging-local
WORKDIR /opt/airflow
