//! `vlapic timeline FILE -o OUT.html [--text]`: reads a `vlapic run --trace` file and
//! writes the page ([`crate::timeline`]) or prints the text digest.

use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

/// Largest trace file read (the main job writes about 0.5 MiB; the recorder's own
/// bound, 8 Mi events, is about 1 GiB of JSON).
const MAX_TRACE_BYTES: u64 = 1 << 30;

/// Arguments of `vlapic timeline`.
#[derive(Args, Debug)]
pub struct TimelineArgs {
    /// A trace written by `vlapic run --trace FILE`.
    pub file: PathBuf,
    /// Where to write the HTML page (self-contained: inline SVG, CSS and script).
    #[arg(
        short = 'o',
        long = "output",
        value_name = "OUT.html",
        required_unless_present = "text"
    )]
    pub output: Option<PathBuf>,
    /// Print the text digest: deepest nesting per vCPU with its vectors, the longest
    /// handler, the busiest IPI pairs, the pauses.
    #[arg(long)]
    pub text: bool,
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("vlapic timeline: {msg}");
    ExitCode::from(2)
}

/// `vlapic timeline`.
pub fn timeline(a: TimelineArgs) -> ExitCode {
    let bytes =
        match vlapic_vmm::files::read_bounded(&a.file, MAX_TRACE_BYTES, "the limit for a trace") {
            Ok(b) => b,
            Err(e) => return fail(e),
        };
    let model = match crate::timeline::Model::parse(&bytes) {
        Ok(m) => m,
        Err(e) => return fail(format!("{}: {e}", a.file.display())),
    };
    if a.text {
        print!("{}", model.digest());
    }
    if let Some(out) = &a.output {
        let title = a
            .file
            .file_name()
            .map_or_else(|| "trace".into(), |n| n.to_string_lossy().into_owned());
        let html = crate::timeline_html::page(&model, &title);
        if let Err(e) = std::fs::write(out, html) {
            return fail(format!("{}: {e}", out.display()));
        }
    }
    ExitCode::SUCCESS
}
