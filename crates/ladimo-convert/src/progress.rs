//! Progress bars on standard error.

use indicatif::{ProgressBar, ProgressStyle};

/// A bar of `len` steps labelled `msg`.
pub(crate) fn bar(len: usize, msg: &str) -> ProgressBar {
    let b = ProgressBar::new(len as u64);
    b.set_style(
        ProgressStyle::with_template("{msg:<28} [{bar:30}] {pos}/{len} {elapsed_precise} left {eta_precise}")
            .expect("template"),
    );
    b.set_message(msg.to_string());
    b
}
