//! How far the long steps have got, told through [`Progress`]: the pipeline says what it is doing
//! and how far it is; whoever runs it decides what to show. The `ladimo` and `cargo xtask`
//! binaries draw terminal bars; tests and other callers pass [`Silent`]. No library crate draws
//! anything (nor depends on a progress-bar crate).

/// Starts a [`Tracker`] for each stretch of work the pipeline reports on.
pub trait Progress: Sync {
    /// A task of `len` steps labelled `label` has begun, at step 0.
    fn start(&self, len: usize, label: &str) -> Box<dyn Tracker + '_>;
}

/// One stretch of work: its length, how far it got and its label may change while it runs.
pub trait Tracker {
    fn set_len(&self, len: usize);
    fn set_position(&self, pos: usize);
    fn inc(&self, n: usize);
    fn set_label(&self, label: &str);
    /// Done: whatever shows it stays as it is.
    fn finish(&self);
    /// Done: whatever shows it goes away.
    fn clear(&self);
}

/// Shows nothing.
pub struct Silent;

impl Progress for Silent {
    fn start(&self, _: usize, _: &str) -> Box<dyn Tracker + '_> {
        Box::new(Silent)
    }
}

impl Tracker for Silent {
    fn set_len(&self, _: usize) {}
    fn set_position(&self, _: usize) {}
    fn inc(&self, _: usize) {}
    fn set_label(&self, _: &str) {}
    fn finish(&self) {}
    fn clear(&self) {}
}
