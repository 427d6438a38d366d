"""warmcast's data path: schemas, storage, ingest, validation, demand series, config, CLI. Never imports airflow."""
