"""Views the Superset dashboards read (through the read-only role)."""

VIEWS_SQL = "SELECT 1"
