#!/usr/bin/env bash
# The install check: what a new user gets from a normal install, not from this checkout.
# Builds the wheel, installs it with requirements.lock (hashes required) into a fresh virtual
# environment, and from an empty directory, with an environment that holds nothing of ours, runs:
# --version, init, check (init's file and the example), schema, db upgrade on SQLite and on the local
# PostgreSQL (its own database, replyclock_install_check), demo, manifest, and web until /healthz
# answers, then Ctrl-C. Any failing command or any traceback fails it.
#   PYTHON (default python3), PGURL (default postgresql://postgres@127.0.0.1:5432/replyclock_install_check)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
PGURL=${PGURL:-postgresql://postgres@127.0.0.1:5432/replyclock_install_check}
work=$(mktemp -d)
web_pid=
cleanup() {
  if [ -n "$web_pid" ]; then kill "$web_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
started=$SECONDS

echo "-- build the wheel"
"$PYTHON" -m venv "$work/build-venv"
"$work/build-venv/bin/python" -m pip install --quiet --disable-pip-version-check 'build>=1.2'
"$work/build-venv/bin/python" -m build --wheel --outdir "$work/dist" "$root" >"$work/build.log" 2>&1 \
  || { cat "$work/build.log"; exit 1; }
wheel=$(ls "$work"/dist/replyclock-*.whl)
rm -rf "$root/build"  # setuptools' scratch folder in the checkout

echo "   built in $((SECONDS - started)) s"
echo "-- install $(basename "$wheel") with requirements.lock into a fresh virtual environment"
# The locked wheels are kept between runs in a wheelhouse (hashes are checked on every install);
# installing from it with --no-index and without byte-compiling keeps this step to seconds.
wheelhouse=${REPLYCLOCK_WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/replyclock-ci/wheels}
mkdir -p "$wheelhouse"
"$PYTHON" -m venv --without-pip "$work/venv"
pip=("$work/build-venv/bin/python" -m pip --disable-pip-version-check --quiet --python "$work/venv/bin/python")
locked=(install --no-compile --no-index --find-links "$wheelhouse" --require-hashes -r "$root/requirements.lock")
if ! "${pip[@]}" "${locked[@]}" 2>/dev/null; then
  "$work/build-venv/bin/python" -m pip download --disable-pip-version-check --quiet --require-hashes \
    -r "$root/requirements.lock" -d "$wheelhouse" 2>&1 | grep -v "is ignored: it is neither" || true
  "${pip[@]}" "${locked[@]}"
fi
"${pip[@]}" install --no-compile --no-deps "$wheel"
"${pip[@]}" check
echo "   installed at $((SECONDS - started)) s"

mkdir "$work/empty"
cd "$work/empty"
# Nothing of the checkout or of the caller's settings: only the installed package.
clean=(env -i "HOME=$work/empty" "PATH=$work/venv/bin:/usr/bin:/bin" "LANG=C.UTF-8" "TZ=UTC")

fail() { echo "install check FAILED: $*" >&2; exit 1; }
# step NAME COMMAND...: run it with a clean environment; it must succeed without a traceback.
step() {
  local name=$1
  shift
  if ! "${clean[@]}" "$@" >"$work/out" 2>"$work/err"; then
    cat "$work/out" "$work/err" >&2
    fail "$name exited non-zero"
  fi
  if grep -q "Traceback" "$work/out" "$work/err"; then
    cat "$work/err" >&2
    fail "$name printed a traceback"
  fi
  echo "ok   $name"
}

step "the package comes from the wheel, Alembic from its library" python -c '
import alembic.command, bot, storage.migrate, sys
assert "site-packages" in bot.__file__, bot.__file__
assert "site-packages" in alembic.__file__ and hasattr(alembic.command, "upgrade"), alembic.__file__
print(storage.migrate.migrations_dir())
assert "site-packages/storage/migrations" in str(storage.migrate.migrations_dir())
'
step "replyclock --version" replyclock --version
grep -q "^replyclock [0-9]" "$work/out" || fail "--version printed $(cat "$work/out")"
step "replyclock (help)" replyclock
step "replyclock init" replyclock init --yes --team support --channel '#support' --timezone Europe/Berlin
step "replyclock check (init's files)" replyclock check
step "replyclock schema" replyclock schema
grep -q '"\$schema"' "$work/out" || fail "schema printed no JSON Schema"
cp "$root/examples/replyclock.toml" example.toml
step "replyclock check (the example)" env X_BEARER_TOKEN=install-check X_CONSUMER_KEY=install-check \
  X_CONSUMER_SECRET=install-check X_ACCESS_TOKEN=install-check X_ACCESS_TOKEN_SECRET=install-check \
  MASTODON_ACCESS_TOKEN=install-check WEBHOOK_SECRET_SHOP=install-check-webhook-secret-of-32-bytes \
  replyclock check --config example.toml
step "replyclock db upgrade (SQLite from .env)" replyclock db upgrade
[ -s replyclock.db ] || fail "db upgrade left no replyclock.db"

echo "-- PostgreSQL database ${PGURL##*/} (dropped and created)"
"$work/venv/bin/python" - "$PGURL" <<'PY'
import sys
import psycopg
from psycopg import sql
base, name = sys.argv[1].rsplit("/", 1)
with psycopg.connect(base + "/postgres", autocommit=True) as conn:
    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
PY
step "replyclock db upgrade (PostgreSQL)" env DATABASE_URL="$PGURL" replyclock db upgrade
grep -q "schema current" "$work/out" || fail "db upgrade on PostgreSQL: $(cat "$work/out")"
step "replyclock demo" replyclock demo
grep -q "figures: [0-9][0-9]* conversations, [0-9][0-9]* answered" "$work/out" || fail "the demo did not finish its story"
step "replyclock manifest" replyclock manifest --request-url https://x.example
grep -q '"https://x.example/slack/events"' "$work/out" || fail "manifest request URL"

free_port() { "$work/venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
operator_port=$(free_port)
"${clean[@]}" HOST=127.0.0.1 PORT="$port" OPERATOR_PORT="$operator_port" replyclock web >"$work/web.out" 2>"$work/web.err" &
web_pid=$!
healthy=
for _ in $(seq 1 150); do
  if "$work/venv/bin/python" -c "import json, sys, urllib.request; sys.exit(0 if json.load(urllib.request.urlopen('http://127.0.0.1:$port/healthz', timeout=2)) == {'status': 'ok'} and json.load(urllib.request.urlopen('http://127.0.0.1:$operator_port/healthz', timeout=2))['database']['ok'] else 1)" 2>/dev/null; then
    healthy=yes
    break
  fi
  kill -0 "$web_pid" 2>/dev/null || break
  sleep 0.2
done
kill -INT "$web_pid" 2>/dev/null || true
web_status=0
wait "$web_pid" || web_status=$?
web_pid=
[ -n "$healthy" ] || { cat "$work/web.err" >&2; fail "replyclock web: /healthz never answered ok"; }
[ "$web_status" -eq 0 ] || { cat "$work/web.err" >&2; fail "replyclock web exited $web_status on Ctrl-C"; }
! grep -q Traceback "$work/web.out" "$work/web.err" || { cat "$work/web.err" >&2; fail "replyclock web printed a traceback"; }
grep -q '"replyclock running"' "$work/web.err" || fail "replyclock web logged no start-up line"
echo "ok   replyclock web (public and operator /healthz answered, Ctrl-C stopped it)"
echo "install check passed in $((SECONDS - started)) s"
