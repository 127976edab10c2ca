//! Command-line entry points. Each subcommand is a thin shell over a module that does the
//! work, so the same code runs from tests.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Just-in-time network access for machines, on Kubernetes.
#[derive(Debug, Parser)]
#[command(name = "portcullis", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// What to run.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the CustomResourceDefinitions as YAML (what `crds/` holds).
    Crds,
}

/// Runs a parsed command line and maps the outcome to an exit code.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Crds => match crate::api::crds_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("portcullis: cannot render the CRDs: {error}");
                ExitCode::FAILURE
            }
        },
    }
}
