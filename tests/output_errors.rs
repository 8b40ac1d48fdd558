//! Output that cannot be written is a clear error, a non-zero exit and no output folder, whole or
//! partial: a full disk (a 256 KiB tmpfs) and a read-only folder (a read-only tmpfs; as root,
//! permissions alone would not stop a write). `convert` (configs/ci.toml, the tiny model) runs as
//! a child process, as a user would run it. Mounting needs root (CAP_SYS_ADMIN); without it the
//! test says so and checks nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

fn ci_config() -> PathBuf {
    ladimo_tests::repo_root().join("configs/ci.toml")
}

/// A tmpfs mounted on a folder, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, options: &str) -> Result<Self, String> {
        std::fs::create_dir_all(dir).unwrap();
        let o = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !o.status.success() {
            return Err(String::from_utf8_lossy(&o.stderr).trim().to_string());
        }
        Ok(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Runs convert; returns (success, stderr).
fn convert(out: &Path, work: &Path) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_ladimo-convert-child"))
        .arg("--config")
        .arg(ci_config())
        .arg("--out")
        .arg(out)
        .arg("--work")
        .arg(work)
        .env_remove("LADIMO_PAUSE_AT")
        .output()
        .expect("run the convert child");
    (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned())
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// The last line of the log: the error as the user sees it.
fn error_line(stderr: &str) -> &str {
    stderr.lines().rev().find(|l| l.starts_with("error:")).unwrap_or("")
}

#[test]
fn a_full_disk_or_a_read_only_folder_is_a_clear_error_and_leaves_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let (full, read_only) = (dir.path().join("full"), dir.path().join("read-only"));
    let _full_fs = match Tmpfs::mount(&full, "size=256k") {
        Ok(m) => m,
        Err(why) => {
            eprintln!("skipped: cannot mount a tmpfs here ({why}); this test needs root");
            return;
        }
    };
    let _ro_fs = Tmpfs::mount(&read_only, "ro,size=64k").expect("mount a read-only tmpfs");
    // The work folder on the ordinary disk: every step runs, then the output does not fit.
    let work = dir.path().join("work");

    // Disk full: the finished folder is copied onto the small file system and does not fit.
    let out = full.join("tiny-moe");
    let (ok, log) = convert(&out, &work);
    let err = error_line(&log);
    eprintln!("disk full: {err}");
    assert!(!ok, "convert succeeded on a full disk:\n{log}");
    assert!(
        err.contains(&out.display().to_string()),
        "the error names the output: {err}"
    );
    assert!(err.contains("No space left on device"), "the error says why: {err}");
    assert!(entries(&full).is_empty(), "left behind: {:?}", entries(&full));

    // Read-only: refused before any work is redone, naming the folder.
    let out = read_only.join("tiny-moe");
    let (ok, log) = convert(&out, &work);
    let err = error_line(&log);
    eprintln!("read-only: {err}");
    assert!(!ok, "convert succeeded in a read-only folder:\n{log}");
    assert!(
        err.contains(&read_only.display().to_string()),
        "the error names the folder: {err}"
    );
    assert!(err.contains("Read-only file system"), "the error says why: {err}");
    assert!(entries(&read_only).is_empty());

    // Disk full with the work folder on it too: stage 1 cannot save, and says which file.
    let out = full.join("tiny-moe");
    let (ok, log) = convert(&out, &full.join("work"));
    let err = error_line(&log);
    eprintln!("disk full, work folder on it: {err}");
    assert!(!ok);
    assert!(
        err.contains(&full.display().to_string()) && err.contains("No space left on device"),
        "{err}"
    );
    assert!(!out.exists() && !full.join(".tiny-moe.partial").exists());
}
