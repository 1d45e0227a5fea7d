"""Superset 6.1 config for the local F1 telemetry stack (no Docker, no Celery, no Redis).

Loaded via SUPERSET_CONFIG_PATH=<repo>/superset/superset_config.py. Everything secret
comes from the environment set by the stack launcher; nothing secret lives here.
"""

import hashlib
import hmac
import logging
import os


def _required(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        # Raised at import: `superset ...` and gunicorn both stop with this message.
        raise RuntimeError(
            f"{name} is not set: export it (see superset/README.md) before running Superset."
        )
    return value


# Signs session cookies and JWTs and encrypts stored DB passwords. Keep it stable: after a
# change the saved `telemetry` password no longer decrypts ("Invalid decryption key"), and
# 6.1's `superset re-encrypt-secrets` is a silent no-op (apache/superset#39391).
SECRET_KEY = _required("SUPERSET_SECRET_KEY")
if len(SECRET_KEY) < 32:
    raise RuntimeError("SUPERSET_SECRET_KEY is too short: use `openssl rand -base64 42`.")


def _derived_secret(purpose: str) -> str:
    """A key of its own per use, derived from SECRET_KEY (which it does not reveal)."""
    return hmac.new(SECRET_KEY.encode(), purpose.encode(), hashlib.sha256).hexdigest()


# Superset ships these two JWT keys as fixed strings ("test-...-change-me"). Both
# features are off here (EMBEDDED_SUPERSET, GLOBAL_ASYNC_QUERIES), but a public key
# must not be what signs guest tokens the day someone turns embedding on.
GUEST_TOKEN_JWT_SECRET = _derived_secret("guest-token-jwt")
GLOBAL_ASYNC_QUERIES_JWT_SECRET = _derived_secret("async-queries-jwt")
# No mail server: alerts and reports are off. Superset's default password is "superset".
SMTP_PASSWORD = None

# Metadata DB, e.g. postgresql+psycopg2://superset:PW@127.0.0.1:5432/superset
SQLALCHEMY_DATABASE_URI = _required("SUPERSET_DATABASE_URI")
# Survive a PostgreSQL restart without a stale-connection error on the first request.
SQLALCHEMY_ENGINE_OPTIONS = {"pool_pre_ping": True}

# Everything runs synchronously inside gunicorn: no Celery workers or beat.
CELERY_CONFIG = None
RESULTS_BACKEND = None

# Per-process in-memory caches: enough for one user; metadata-DB caches stay default.
_SIMPLE_CACHE = {"CACHE_TYPE": "SimpleCache", "CACHE_DEFAULT_TIMEOUT": 300, "CACHE_THRESHOLD": 500}
CACHE_CONFIG = {**_SIMPLE_CACHE, "CACHE_KEY_PREFIX": "superset_"}
DATA_CACHE_CONFIG = {**_SIMPLE_CACHE, "CACHE_KEY_PREFIX": "superset_data_"}

# Defaults already have these off; pinned so an upgrade cannot silently turn on features
# that need Celery, a headless browser or extra RBAC setup.
FEATURE_FLAGS = {
    "ALERT_REPORTS": False,
    "THUMBNAILS": False,
    "DASHBOARD_RBAC": False,
    "ENABLE_TEMPLATE_PROCESSING": False,  # no Jinja in SQL Lab
    "EMBEDDED_SUPERSET": False,
}

# Security headers (CSP etc.) stay on. The default TALISMAN_CONFIG already has
# force_https=False, which is what plain-HTTP localhost needs.
TALISMAN_ENABLED = True
SESSION_COOKIE_SECURE = False  # cookies must travel over http://127.0.0.1
SESSION_COOKIE_SAMESITE = "Lax"

# CSRF stays on for the browser UI. REST clients using a JWT bearer token need no CSRF
# token for GET; write calls need X-CSRFToken from /api/v1/security/csrf_token/ plus
# the session cookie of that request (see README).
WTF_CSRF_ENABLED = True

# Refuse SQLite and other unsafe URIs as data sources; only PostgreSQL is expected.
PREVENT_UNSAFE_DB_CONNECTIONS = True

# SQL Lab defaults kept: DML off per database, 30 s sync query timeout (< gunicorn --timeout).

# Quiet logs: warnings and above unless SUPERSET_LOG_LEVEL says otherwise.
LOG_LEVEL = getattr(logging, os.environ.get("SUPERSET_LOG_LEVEL", "WARNING").upper())
# 6.1 wheels lack the frontend source file this warns about on every page view (cosmetic,
# apache/superset#40478; the UI falls back to its bundled spinner): drop just that line.
logging.getLogger("superset.views.base").addFilter(
    lambda record: not record.getMessage().startswith("Could not load default spinner SVG")
)
