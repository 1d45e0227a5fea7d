"""F1 telemetry platform: all logic, importable without Airflow."""
