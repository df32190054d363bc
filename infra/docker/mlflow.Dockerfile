# MLflow's own image plus the PostgreSQL driver and boto3 (S3 artifacts), started as infra/compose.yaml runs it.
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir "mlflow[auth]==3.17.2" "psycopg[binary]>=3.2" boto3
COPY infra/docker/mlflow-server.sh /usr/local/bin/mlflow-server.sh
ENTRYPOINT ["/usr/local/bin/mlflow-server.sh"]
