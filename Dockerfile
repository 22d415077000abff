# The project's image: study workers (`python -m emnist_hpo study`), the MLflow
# tracking server and the Optuna dashboard of docker-compose.yml all run it.
# Stages: `cpu` (the default build, TensorFlow on CPU) and `gpu` (adds JAX with
# CUDA 12 for the compose file's `worker-gpu`, KERAS_BACKEND=jax).
FROM python:3.11-slim AS cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=3

WORKDIR /opt/emnist-hpo
COPY . .

# The project with its pinned dependencies, PostgreSQL's driver, and Flask-WTF
# (MLflow's `auth` extra) for the server's basic auth.
RUN pip install . psycopg2-binary "Flask-WTF<2" \
 && useradd --create-home --uid 10001 app \
 && mkdir -p /mlartifacts /var/lib/mlflow-auth /data/emnist \
 && chown -R app:app /opt/emnist-hpo /mlartifacts /var/lib/mlflow-auth

# Named volumes mounted on these folders start out owned by `app`.
USER app
CMD ["python", "-m", "emnist_hpo", "--help"]

# GPU workers: JAX's CUDA 12 wheels bring their own CUDA libraries; the host needs
# an NVIDIA driver and the NVIDIA Container Toolkit. `docker build --target gpu .`
FROM cpu AS gpu
ARG JAX_SPEC="jax[cuda12]==0.12.0.1"
USER root
RUN pip install "${JAX_SPEC}"
USER app
ENV KERAS_BACKEND=jax

# A build without --target gives the CPU image.
FROM cpu
