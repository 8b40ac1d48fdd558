//! Terminal progress bars for the pipeline's [`Progress`] reports, drawn on standard error, and
//! the conversion run with them ([`convert`]). The libraries only say how far they got; the
//! binaries draw (`cargo xtask` includes this file too).

use indicatif::{ProgressBar, ProgressStyle};
use ladimo_convert::{Progress, Tracker};

/// `ladimo convert` and `cargo xtask convert`: the whole pipeline on this binary's backend, with
/// bars.
pub fn convert(a: ladimo_convert::ConvertArgs) -> anyhow::Result<()> {
    let device = ladimo_backend::device();
    let on = ladimo_convert::Compute {
        device: &device,
        backend: ladimo_backend::name(),
        progress: &Bars,
    };
    ladimo_convert::run(a, &on).map(|_| ())
}

/// Draws every reported task as a bar of its own.
pub struct Bars;

impl Progress for Bars {
    fn start(&self, len: usize, label: &str) -> Box<dyn Tracker + '_> {
        let b = ProgressBar::new(len as u64);
        b.set_style(
            ProgressStyle::with_template("{msg:<28} [{bar:30}] {pos}/{len} {elapsed_precise} left {eta_precise}")
                .expect("template"),
        );
        b.set_message(label.to_string());
        Box::new(Bar(b))
    }
}

struct Bar(ProgressBar);

impl Tracker for Bar {
    fn set_len(&self, len: usize) {
        self.0.set_length(len as u64);
    }
    fn set_position(&self, pos: usize) {
        self.0.set_position(pos as u64);
    }
    fn inc(&self, n: usize) {
        self.0.inc(n as u64);
    }
    fn set_label(&self, label: &str) {
        self.0.set_message(label.to_string());
    }
    fn finish(&self) {
        self.0.finish();
    }
    fn clear(&self) {
        self.0.finish_and_clear();
    }
}
