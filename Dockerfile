# Airflow 3.3.2 with the HealthImaging operators, sensor and trigger (and the local endpoint, extra [local]).
# Build: docker compose build   (or: docker build -t airflow-healthimaging:3.3.2 .)
FROM apache/airflow:3.3.2

ARG AIRFLOW_VERSION=3.3.2
WORKDIR /opt/airflow-healthimaging
COPY --chown=airflow:0 pyproject.toml constraints.txt README.md ./
COPY --chown=airflow:0 plugins/healthimaging ./plugins/healthimaging
COPY --chown=airflow:0 healthimaging_local ./healthimaging_local
# Pin Airflow so pip never up- or downgrades the image's own Airflow; everything else follows constraints.txt.
RUN pip install --no-cache-dir -c constraints.txt "apache-airflow==${AIRFLOW_VERSION}" ".[local]" \
    && mkdir -p /home/airflow/healthimaging-local
WORKDIR /opt/airflow
