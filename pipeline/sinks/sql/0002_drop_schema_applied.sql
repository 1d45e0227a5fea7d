-- ensure_schema() stored a digest of the whole schema here; schema_migrations replaces it.
DROP TABLE IF EXISTS schema_applied;
