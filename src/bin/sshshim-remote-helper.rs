//! The remote helper alone (`sshshim remote-helper` without the rest of
//! sshshim): what `--resume` uploads to the server when it is installed
//! beside `sshshim`. A fraction of the size, so it starts faster, and a
//! resumable command starts with it.

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut argv = std::env::args_os().skip(1).peekable();
    // Invoked as sshshim is: `PATH remote-helper ARGS...`.
    if argv.peek().is_some_and(|a| a == "remote-helper") {
        argv.next();
    }
    sshshim::resume::remote::main(argv.collect())
}
