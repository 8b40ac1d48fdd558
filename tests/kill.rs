//! A killed `convert` loses nothing: the tiny model (configs/ci.toml) is converted once without
//! interruption, and once in a process that is SIGKILLed during stage 1, then (resumed) during
//! stage 2, then (resumed again) during export, and finally resumed to the end. The two output
//! folders must be byte-equal, but for the timings in report.json (and report.md, rendered from it).
//!
//! The kills land at fixed points through `LADIMO_PAUSE_AT` (ladimo_convert::pause): the child
//! waits at the named point, says so on stderr, and is killed there.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ladimo_convert::pause::{PAUSE_ENV, PAUSED_LINE};

fn ci_config() -> PathBuf {
    ladimo_tests::repo_root().join("configs/ci.toml")
}

/// `convert --config configs/ci.toml --out OUT` as a child process.
fn convert(out: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ladimo-convert-child"));
    c.arg("--config").arg(ci_config()).arg("--out").arg(out);
    c.env_remove(PAUSE_ENV);
    c
}

fn run_to_end(out: &Path) {
    let o = convert(out).output().expect("run the convert child");
    assert!(
        o.status.success(),
        "convert {} failed:\n{}",
        out.display(),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Starts convert with `LADIMO_PAUSE_AT=point`, waits until it pauses there, SIGKILLs it.
fn kill_at(out: &Path, point: &str) {
    let mut child = convert(out)
        .env(PAUSE_ENV, point)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the convert child");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut seen = String::new();
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            seen.push_str(&line);
            seen.push('\n');
            if line.starts_with(PAUSED_LINE) {
                let _ = tx.send(line);
            }
        }
        seen
    });
    let paused = rx.recv_timeout(Duration::from_secs(600));
    // SIGKILL (`Child::kill` sends SIGKILL on Unix): no chance to clean up.
    child.kill().expect("kill the convert child");
    let status = child.wait().unwrap();
    let log = reader.join().unwrap();
    match paused {
        Ok(line) => assert!(line.contains(point), "paused at the wrong point: {line}"),
        Err(_) => panic!("convert never paused at {point} ({status}):\n{log}"),
    }
    assert!(!out.exists(), "killed at {point}, yet {} exists", out.display());
}

/// Every file under `dir`, relative, sorted.
fn files(dir: &Path) -> Vec<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.push(p.strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    let mut v = Vec::new();
    walk(dir, dir, &mut v);
    v.sort();
    v
}

/// report.json without what is measured in seconds: stage times, wall time, tokens/s, the
/// zero-shot tasks' scoring time.
fn report_without_timings(path: &Path) -> serde_json::Value {
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let o = v.as_object_mut().unwrap();
    o.remove("times");
    o.remove("wall_seconds");
    for side in ["dense", "moe"] {
        let s = o[side].as_object_mut().unwrap();
        s.remove("prefill_tok_s");
        s.remove("decode_tok_s");
    }
    for task in o["tasks"].as_array_mut().unwrap() {
        task.as_object_mut().unwrap().remove("seconds");
    }
    v
}

#[test]
fn a_convert_killed_in_stage_1_stage_2_and_export_resumes_to_the_same_output() {
    let t = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let reference = dir.path().join("reference");
    run_to_end(&reference);
    let uninterrupted = t.elapsed();

    let resumed = dir.path().join("resumed");
    let t = Instant::now();
    for point in ["stage1-layer1", "stage2-profile", "export"] {
        kill_at(&resumed, point);
        // What each kill left to resume from.
        let work = dir.path().join("resumed.work");
        match point {
            "stage1-layer1" => assert!(work.join("stage1/layer000.json").is_file(), "layer 0 was saved"),
            "stage2-profile" => assert!(work.join("stage1/done.json").is_file(), "stage 1 finished"),
            _ => assert!(
                work.join("final/model.safetensors").is_file(),
                "the checkpoint was written"
            ),
        }
    }
    run_to_end(&resumed);
    eprintln!(
        "uninterrupted: {:.1} s; killed three times and resumed: {:.1} s",
        uninterrupted.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );

    let (a, b) = (files(&reference), files(&resumed));
    assert_eq!(a, b, "the same files");
    for rel in &a {
        let (x, y) = (reference.join(rel), resumed.join(rel));
        match rel.to_str().unwrap() {
            "report.json" => assert_eq!(
                report_without_timings(&x),
                report_without_timings(&y),
                "report.json, timings aside"
            ),
            // Rendered from report.json, timings included: checked through report.json above,
            // and here that each is the rendering of its own report.json.
            "report.md" => {
                for out in [&reference, &resumed] {
                    let r: ladimo_convert::Report =
                        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
                    assert_eq!(
                        std::fs::read_to_string(out.join("report.md")).unwrap(),
                        ladimo_convert::report::markdown(&r)
                    );
                }
            }
            _ => ladimo_tests::assert_same_bytes(&x, &y, rel.to_str().unwrap()),
        }
    }
    // Nothing half-written left beside the output.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial") || n.ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
