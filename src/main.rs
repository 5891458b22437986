//! The `deepis` binary: see `deepis --help`.
fn main() {
    std::process::exit(deepis::cli::main_entry());
}
