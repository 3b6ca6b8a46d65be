#!/usr/bin/env bash
# Builds and runs etl-duckdb with the arguments given (none: the embedded
# default job, output in ./etl-output).
#
# DuckDB: links the prebuilt libduckdb that libduckdb.sh fetches from the npm
# registry (about a minute to build). ETL_DUCKDB_BUNDLED=1 compiles DuckDB from
# its C++ sources instead (the crate's `bundled` feature: long, see README).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
features=()
if [[ ${ETL_DUCKDB_BUNDLED:-0} == 1 ]]; then
  features=(--features bundled)
else
  DUCKDB_LIB_DIR=${DUCKDB_LIB_DIR:-$("$here/libduckdb.sh")}
  export DUCKDB_LIB_DIR
fi
exec cargo run --release --manifest-path "$here/Cargo.toml" "${features[@]}" -- "$@"
