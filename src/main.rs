//! The `portcullis` binary: parses the command line and hands over to [`portcullis::cli`].

use clap::Parser;

fn main() -> std::process::ExitCode {
    portcullis::cli::run(portcullis::cli::Cli::parse())
}
