#!/usr/bin/env bash
# The whole check: lint, types, layering, then the test suite (with a PostgreSQL server for the store tests).
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"

status=0
echo "== ruff";          ruff check src tests bench || status=1
echo "== mypy";          mypy || status=1
echo "== import-linter"; lint-imports --no-cache || status=1

# PostgreSQL for the store tests: start the local cluster and make a throwaway database.
if [ -z "${USSYCODE_TEST_PG_URL:-}" ] && [ "$(id -u)" -eq 0 ] && command -v pg_lsclusters >/dev/null; then
  cluster=$(pg_lsclusters -h | awk 'NR==1 {print $1" "$2}')
  if [ -n "$cluster" ]; then
    pg_ctlcluster $cluster start 2>/dev/null || true
    if su postgres -c "psql -qtAc 'select 1'" >/dev/null 2>&1; then
      su postgres -c "psql -qc \"DROP DATABASE IF EXISTS ussycode_test\"" >/dev/null
      su postgres -c "psql -qc \"DO \\\$\\\$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname='ussycode') THEN CREATE ROLE ussycode LOGIN PASSWORD 'ussycode'; END IF; END \\\$\\\$\"" >/dev/null
      su postgres -c "psql -qc \"CREATE DATABASE ussycode_test OWNER ussycode\"" >/dev/null
      port=$(pg_lsclusters -h | awk 'NR==1 {print $3}')
      export USSYCODE_TEST_PG_URL="postgresql://ussycode:ussycode@127.0.0.1:${port}/ussycode_test"
    fi
  fi
fi

# The full image (toolchains, pi and opencode) for the tests that need it: a few minutes once, cached afterwards.
images="${USSYCODE_TEST_IMAGES_DIR:-/var/tmp/ussycode-test-images}"
echo "== full image"
if ! ussycode image build --name ussyuntu --if-missing --images-dir "$images" --data-dir "$images/.build-data"; then
  echo "the full image could not be built here: the tests that need it skip and say so"
fi

# The official OpenAI and Anthropic SDKs, as wheels for the image's Python, for the test that uses them inside a VM
# (it installs them there from this directory, with no index).
wheels="$images/sdk-wheels"
echo "== SDK wheels"
if ! ls "$wheels"/openai-3.60.0-*.whl "$wheels"/anthropic-2.16.0-*.whl >/dev/null 2>&1; then
  rm -rf "$wheels"
  pip download -q --only-binary=:all: --python-version 3.11 --platform manylinux2014_x86_64 \
      --platform manylinux_2_17_x86_64 -d "$wheels" openai==3.60.0 anthropic==2.16.0 2>/dev/null \
    || { rm -rf "$wheels"; echo "the SDK wheels could not be downloaded: the test that needs them skips"; }
fi

echo "== pytest"
pytest "$@"
rc=$?
if [ $rc -eq 5 ]; then echo "pytest collected no tests"; rc=1; fi
[ $rc -ne 0 ] && status=$rc
exit $status
