//! `vlapic inspect`, `vlapic convert` and `vlapic replay` (issue 4: being built).

use clap::Args;
use std::process::ExitCode;

/// Arguments of `vlapic inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {}

/// Arguments of `vlapic convert`.
#[derive(Args, Debug)]
pub struct ConvertArgs {}

/// Arguments of `vlapic replay`.
#[derive(Args, Debug)]
pub struct ReplayArgs {}

pub fn inspect(_a: InspectArgs) -> ExitCode {
    eprintln!("vlapic inspect: not built yet");
    ExitCode::from(2)
}

pub fn convert(_a: ConvertArgs) -> ExitCode {
    eprintln!("vlapic convert: not built yet");
    ExitCode::from(2)
}

pub fn replay(_a: ReplayArgs) -> ExitCode {
    eprintln!("vlapic replay: not built yet");
    ExitCode::from(2)
}
