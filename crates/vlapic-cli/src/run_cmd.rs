//! `vlapic run` and `vlapic bench` (issue 5: being built).

use clap::Args;
use std::process::ExitCode;

/// Arguments of `vlapic run`.
#[derive(Args, Debug)]
pub struct RunArgs {}

/// Arguments of `vlapic bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {}

pub fn run(_a: RunArgs) -> ExitCode {
    eprintln!("vlapic run: not built yet");
    ExitCode::from(2)
}

pub fn bench(_a: BenchArgs) -> ExitCode {
    eprintln!("vlapic bench: not built yet");
    ExitCode::from(2)
}
