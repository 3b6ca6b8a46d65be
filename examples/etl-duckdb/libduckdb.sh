#!/usr/bin/env bash
# Prints a directory holding a prebuilt libduckdb.so (DuckDB 1.5.6, Linux
# x86-64, glibc), fetching it first if it is not there yet.
#
# The library comes from the npm registry: DuckDB's own Node bindings package
# @duckdb/node-bindings-linux-x64 ships it. Linking it (DUCKDB_LIB_DIR) spares
# the build DuckDB's C++ sources, which take most of an hour on 2 cores with
# the crate's `bundled` feature. The version must match the duckdb crate
# (=1.10506.0 in Cargo.toml, i.e. DuckDB 1.5.6).
#
#   DUCKDB_LIB_DIR=$(examples/etl-duckdb/libduckdb.sh)
#
# Cache: $ETL_DUCKDB_CACHE (default ~/.cache/bergtalzug-etl).
set -euo pipefail

PACKAGE=@duckdb/node-bindings-linux-x64
VERSION=1.5.6-r.1
# npm's dist.integrity of that package version.
INTEGRITY=sha512-IXcrZJE6kEqM0Z4wwdVnGBHX/frOS33VPNAwDXQ/Q+Fs84b058Qe94chrCCIcNJlG8Y3UHIUU4eBeCQxW5mN1Q==

cache=${ETL_DUCKDB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/bergtalzug-etl}
dir=$cache/libduckdb-$VERSION
if [[ -f $dir/libduckdb.so ]]; then
  echo "$dir"
  exit 0
fi

if [[ $(uname -sm) != "Linux x86_64" ]]; then
  echo "libduckdb.sh: the prebuilt library is for Linux x86-64; build with --features bundled instead" >&2
  exit 1
fi
if ! command -v npm >/dev/null; then
  echo "libduckdb.sh: npm is needed to fetch libduckdb (apt-get install npm), or build with --features bundled" >&2
  exit 1
fi

mkdir -p "$cache"
tmp=$(mktemp -d "$cache/fetch.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "$PACKAGE@$VERSION" >/dev/null)
tgz=$(ls "$tmp"/*.tgz)
got="sha512-$(openssl dgst -sha512 -binary "$tgz" | base64 -w0)"
if [[ $got != "$INTEGRITY" ]]; then
  echo "libduckdb.sh: $PACKAGE@$VERSION does not match its pinned integrity" >&2
  exit 1
fi
tar -xzf "$tgz" -C "$tmp" package/libduckdb.so
mkdir -p "$tmp/lib"
mv "$tmp/package/libduckdb.so" "$tmp/lib/"
rm -rf "$dir"
mv "$tmp/lib" "$dir"
echo "fetched $PACKAGE@$VERSION into $dir" >&2
echo "$dir"
