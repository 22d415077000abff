-- Run once by the postgres image's entrypoint, on the first start of an empty
-- data volume, as POSTGRES_USER (who then owns both databases).
-- mlflow: the MLflow tracking server's backend store (it creates its own tables).
-- optuna: the Optuna storage shared by all workers (the dashboard creates its tables).
CREATE DATABASE mlflow;
CREATE DATABASE optuna;
