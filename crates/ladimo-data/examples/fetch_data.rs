//! `cargo run --release -p ladimo-data --example fetch_data`: fetch the corpora, with logs
//! (`RUST_LOG=debug` for more), and print where they are.

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let t = std::time::Instant::now();
    match ladimo_data::fetch_data() {
        Ok(ds) => {
            println!("{}", ds.describe());
            eprintln!("took {:.2} s", t.elapsed().as_secs_f64());
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
