"""The local no-Docker stack: PostgreSQL, Kafka, MLflow, Airflow and Superset.

Python rather than shell so that `make up`, `make status` and the integration
test fixtures share one implementation of start, health check and stop.
"""
