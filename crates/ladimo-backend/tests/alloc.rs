//! The purge-delay option that `keep_freed_memory` sets is the one that decides whether mimalloc
//! hands freed memory back to the OS: with a delay of 0 a freed 256 MiB buffer leaves the resident
//! set, after `keep_freed_memory` it stays (ready for the next tensor, without page faults).
#![cfg(all(feature = "fast-alloc", target_os = "linux"))]

use std::hint::black_box;

const BUF: usize = 256 << 20;

/// Resident set size in bytes (`/proc/self/statm`, pages of 4 KiB).
fn rss() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    statm.split_whitespace().nth(1).unwrap().parse::<usize>().unwrap() * 4096
}

/// Resident bytes gained by allocating, touching and freeing one buffer.
fn kept_after_free() -> usize {
    let before = rss();
    let v = black_box(vec![1u8; BUF]);
    assert!(rss() >= before + BUF / 2, "the buffer was not resident while alive");
    drop(v);
    rss().saturating_sub(before)
}

#[test]
fn freed_memory_is_kept_only_when_told() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        eprintln!("MIMALLOC_PURGE_DELAY is set: the default is not under test");
        return;
    }
    // One test in this binary: nothing else moves the global option meanwhile.
    ladimo_backend::set_purge_delay_ms(0);
    let purged = kept_after_free();
    assert!(purged < BUF / 4, "with purge delay 0, {purged} bytes stayed resident");

    let _ = ladimo_backend::device_named("no-such-backend");
    assert_eq!(ladimo_backend::purge_delay_ms(), -1);
    let kept = kept_after_free();
    assert!(
        kept > BUF / 2,
        "after keep_freed_memory only {kept} of {BUF} bytes stayed resident"
    );
}
