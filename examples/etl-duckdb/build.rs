//! With a prebuilt libduckdb (`DUCKDB_LIB_DIR`, see libduckdb.sh), the
//! binaries and tests find it at run time through an rpath, so they run
//! without LD_LIBRARY_PATH. A `bundled` build links DuckDB statically and
//! needs nothing.

fn main() {
    println!("cargo:rerun-if-env-changed=DUCKDB_LIB_DIR");
    if let Ok(dir) = std::env::var("DUCKDB_LIB_DIR") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
