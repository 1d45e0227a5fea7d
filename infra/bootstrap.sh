#!/usr/bin/env bash
# Installs everything the platform needs, idempotently: Debian packages (when
# missing), uv, the two Python environments from uv.lock, and the Kafka jars from
# Maven Central. Every failure ends with one line saying what is wrong and what to do.
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.13.8
STACK_DIR=${STACK_DIR:-.stack}
say() { printf '\033[1m[install]\033[0m %s\n' "$*"; }
die() { printf '\033[31merror:\033[0m %s\n' "$*" >&2; exit 1; }

# --- Debian packages -------------------------------------------------------------------
missing=()
[ -x /usr/lib/postgresql/15/bin/postgres ] || missing+=(postgresql-15)
java_major=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1 || true)
[ -n "$java_major" ] && [ "$java_major" -ge 17 ] || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || missing+=(maven)
command -v setpriv >/dev/null || missing+=(util-linux)
# Headless browser for dashboard screenshots and the UI tests (driven by Playwright).
command -v chromium >/dev/null || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null \
    || die "missing ${missing[*]} and there is no apt-get: install them with your package manager, then run make up again."
  [ "$(id -u)" -eq 0 ] \
    || die "missing ${missing[*]}: run 'sudo apt-get install -y ${missing[*]}', then make up again."
  say "apt-get install ${missing[*]}"
  apt-get update -qq >/dev/null || die "apt-get update failed: check the Debian mirror in /etc/apt/sources.list*, then run make up again."
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed (see the output above); fix it, then run make up again."
fi

# --- uv and the two Python environments -----------------------------------------------
if command -v uv >/dev/null; then UV=(uv)
elif python3 -m uv --version >/dev/null 2>&1; then UV=(python3 -m uv)
else
  say "pip install uv==$UV_VERSION"
  python3 -m pip install -q "uv==$UV_VERSION" 2>&1 | grep -v "WARNING: Running pip as the 'root'" || true
  python3 -m uv --version >/dev/null 2>&1 || die "could not install uv with pip: install uv (https://docs.astral.sh/uv/), then run make up again."
  UV=(python3 -m uv)
fi
# The platform (pipeline, Airflow, MLflow, dev tools) and Superset cannot share an
# environment (SQLAlchemy 2 vs <2): one lock, two environments. Bytecode is compiled
# at install (once; later syncs skip what is current): without it, a process on a
# machine with PYTHONDONTWRITEBYTECODE set compiled MLflow, XGBoost and scikit-learn
# from source at every start (10 s of each consumer's start, measured).
"${UV[@]}" sync --frozen --quiet --compile-bytecode || die "uv sync failed (see above): check that uv.lock matches pyproject.toml (uv lock)."
UV_PROJECT_ENVIRONMENT=.venv-superset "${UV[@]}" sync --frozen --quiet --compile-bytecode --only-group superset \
  || die "uv sync of the Superset environment failed (see above)."

# --- Kafka jars (Maven Central) -------------------------------------------------------
libs="$STACK_DIR/kafka/libs"
pom_sum=$(sha256sum infra/kafka/pom.xml | cut -d' ' -f1)
if [ "$(cat "$libs/.pom.sha256" 2>/dev/null)" != "$pom_sum" ]; then
  say "fetching the Kafka jars with Maven"
  tmp="$libs.tmp"; rm -rf "$tmp"; mkdir -p "$tmp"
  mvn -q -B -f infra/kafka/pom.xml dependency:copy-dependencies \
      -DoutputDirectory="$(realpath "$tmp")" -DincludeScope=runtime \
    || die "Maven could not fetch the Kafka jars (see above): check access to Maven Central, then run make up again."
  echo "$pom_sum" > "$tmp/.pom.sha256"
  rm -rf "$libs"; mv "$tmp" "$libs"
fi
say "ready"
