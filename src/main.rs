//! The `deepis` binary: see `deepis --help`.
fn main() {
    // Like every Unix tool, end quietly when the reader of stdout goes away (`deepis info W | head`)
    // instead of panicking in println!: restore the default SIGPIPE action Rust sets to ignore.
    // SAFETY: called first thing in main, before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let setup = deepis::io::clean_up_on_signals().and_then(|()| deepis::cli::thread_pool_from_env());
    if let Err(e) = setup {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
    std::process::exit(deepis::cli::main_entry());
}
