//! `convert` as a process of its own, with the same arguments as `ladimo convert`, for the tests
//! that kill it part-way (tests/kill.rs) or watch it fail (tests/output_errors.rs): they need its
//! exit status and its stderr, as a user would see them.

use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: ladimo_convert::ConvertArgs,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let device = ladimo_backend::device();
    let on = ladimo_convert::Compute {
        device: &device,
        backend: ladimo_backend::name(),
        progress: &ladimo_convert::Silent,
    };
    if let Err(e) = ladimo_convert::run(Cli::parse().args, &on) {
        eprintln!("error: {}", ladimo_convert::error_message(&e));
        std::process::exit(1);
    }
}
