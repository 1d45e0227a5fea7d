"""Superset dashboards kept as code: the bundle importer and the screenshot taker."""
