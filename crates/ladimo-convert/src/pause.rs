//! `LADIMO_PAUSE_AT=<point>`: a test hook that makes the conversion stop at a named point and
//! wait there, so that a test can kill it at exactly that point (tests/kill.rs) and check that
//! the next run resumes to the same output. Unset (always, outside such tests), it does nothing.
//!
//! The points, in pipeline order:
//! - `stage1-layer1`: stage 1 has saved layer 0 and started training layer 1;
//! - `stage2-profile`: the stage-2 profile has begun (its first progress report);
//! - `export`: the MoE checkpoint is written into the work folder's `final/`, the rest is not.

/// The environment variable naming the point to pause at.
pub const PAUSE_ENV: &str = "LADIMO_PAUSE_AT";

/// What the paused process writes to stderr (followed by the point's name).
pub const PAUSED_LINE: &str = "ladimo: paused at";

/// Waits forever (until killed) when `LADIMO_PAUSE_AT` names `point`.
pub fn pause_point(point: &str) {
    if std::env::var(PAUSE_ENV).is_ok_and(|v| v == point) {
        eprintln!(
            "{PAUSED_LINE} {point} (pid {}); waiting to be killed",
            std::process::id()
        );
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}
