//! Writing output so that nobody ever sees half of it: every file and folder a user (or a resumed
//! run) reads is built under a temporary name beside its final place and renamed when complete.
//!
//! - [`write_atomic`] / [`write_atomic_with`]: one file. The bytes go to a temporary file in the
//!   same folder (`.NAME.XXXXXX.tmp`), which is synced and then renamed over `path`. On any error
//!   (disk full, read-only folder, ...) the temporary file is removed and the error names `path`.
//! - [`AtomicDir`]: one folder. Built in `.NAME.partial` beside `NAME`, renamed to `NAME` by
//!   [`AtomicDir::commit`]; dropped without a commit (an error, a panic), the partial folder is
//!   removed.
//! - [`copy_dir_atomic`]: a folder copied through an [`AtomicDir`] (where `rename` cannot cross
//!   file systems).
//!
//! A rename within one folder is atomic on POSIX file systems: a reader (or a killed and restarted
//! run) finds either the old content or the new, never a mix.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The folder `path` lives in (`.` for a bare file name).
fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

fn file_name_of(path: &Path) -> Result<String> {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::format(path, "the output path has no file name"))
}

/// Syncs a folder so that a rename inside it survives a power cut; best effort (some file systems
/// refuse to open a folder for syncing).
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// An empty temporary file `.NAME.XXXXXX.tmp` in `path`'s folder (created when missing), removed
/// when dropped unless persisted.
fn temp_beside(path: &Path) -> Result<tempfile::NamedTempFile> {
    let dir = parent_of(path);
    let name = file_name_of(path)?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let prefix = format!(".{name}.");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    // tempfile creates files readable by their owner only; output is as readable as any file
    // (the process umask still applies).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    builder.tempfile_in(dir).map_err(|e| Error::io(path, e))
}

/// Writes `bytes` to `path` atomically (see the module doc), creating the folder when missing.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// Like [`write_atomic`], for output produced by a writer (large or streamed files): `write`
/// gets a buffered writer on the temporary file.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&mut BufWriter<&File>) -> std::io::Result<()>) -> Result<()> {
    // Errors name the final path: that is what the user asked for.
    let fail = |e: std::io::Error| Error::io(path, e);
    let tmp = temp_beside(path)?;
    {
        let mut w = BufWriter::new(tmp.as_file());
        write(&mut w).map_err(fail)?;
        w.flush().map_err(fail)?;
    }
    tmp.as_file().sync_all().map_err(fail)?;
    tmp.persist(path).map_err(|e| fail(e.error))?;
    sync_dir(parent_of(path));
    Ok(())
}

/// Like [`write_atomic`], for a library that writes to a path of its own choosing (e.g.
/// `safetensors::serialize_to_file`): `write` gets the temporary path (an existing, empty file),
/// which is synced and renamed over `path` when `write` succeeds and removed when it fails.
pub fn write_atomic_via<E: From<Error>>(
    path: &Path,
    write: impl FnOnce(&Path) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    let fail = |e: std::io::Error| Error::io(path, e);
    let tmp = temp_beside(path)?;
    write(tmp.path())?;
    File::open(tmp.path()).and_then(|f| f.sync_all()).map_err(fail)?;
    tmp.persist(path).map_err(|e| fail(e.error))?;
    sync_dir(parent_of(path));
    Ok(())
}

/// A folder built under a temporary name and renamed into place when complete.
///
/// ```no_run
/// # fn main() -> ladimo_io::Result<()> {
/// let dir = ladimo_io::atomic::AtomicDir::new(std::path::Path::new("out/model"))?;
/// std::fs::write(dir.path().join("config.json"), "{}").unwrap();
/// dir.commit()?; // out/model appears, complete
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct AtomicDir {
    partial: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl AtomicDir {
    /// Starts `.NAME.partial` beside `dest` (a partial folder left by an earlier, interrupted
    /// attempt is removed first; the parent folder is created when missing).
    pub fn new(dest: &Path) -> Result<Self> {
        let name = file_name_of(dest)?;
        let parent = parent_of(dest);
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        let partial = parent.join(format!(".{name}.partial"));
        if partial.exists() {
            std::fs::remove_dir_all(&partial).map_err(|e| Error::io(&partial, e))?;
        }
        std::fs::create_dir(&partial).map_err(|e| Error::io(dest, e))?;
        Ok(AtomicDir {
            partial,
            dest: dest.to_path_buf(),
            committed: false,
        })
    }

    /// The folder to write into.
    pub fn path(&self) -> &Path {
        &self.partial
    }

    /// Where the folder goes on [`commit`](Self::commit).
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Syncs every file in the folder and renames it into place (an existing non-empty `dest` is
    /// an error: moving an old output aside is the caller's decision).
    pub fn commit(mut self) -> Result<PathBuf> {
        sync_tree(&self.partial)?;
        std::fs::rename(&self.partial, &self.dest).map_err(|e| Error::io(&self.dest, e))?;
        sync_dir(parent_of(&self.dest));
        self.committed = true;
        Ok(self.dest.clone())
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.partial);
        }
    }
}

/// Syncs every regular file under `dir` (files written with `std::fs::write` are not synced).
fn sync_tree(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let p = e.path();
        let kind = e.file_type().map_err(|e| Error::io(&p, e))?;
        if kind.is_dir() {
            sync_tree(&p)?;
        } else if kind.is_file() {
            File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io(&p, e))?;
        }
    }
    sync_dir(dir);
    Ok(())
}

/// Fails (naming `dir`) unless a file can be created in `dir` (created when missing): a read-only
/// folder is refused before any long work rather than at its end.
pub fn check_writable(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    tempfile::Builder::new()
        .prefix(".write-check-")
        .tempfile_in(dir)
        .map(drop)
        .map_err(|e| Error::io(dir, e))
}

/// Copies the folder `from` to `to` (which must not exist) through an [`AtomicDir`]: `to` appears
/// complete or not at all.
pub fn copy_dir_atomic(from: &Path, to: &Path) -> Result<()> {
    if to.exists() {
        return Err(Error::io(
            to,
            std::io::Error::new(std::io::ErrorKind::AlreadyExists, "already exists"),
        ));
    }
    let dir = AtomicDir::new(to)?;
    copy_tree(from, dir.path())?;
    dir.commit()?;
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| Error::io(to, e))?;
    for e in std::fs::read_dir(from).map_err(|e| Error::io(from, e))? {
        let e = e.map_err(|e| Error::io(from, e))?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        if e.file_type().map_err(|e| Error::io(&src, e))?.is_dir() {
            copy_tree(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst).map_err(|e| Error::io(&dst, e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn write_atomic_replaces_and_leaves_no_temporary() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a/b.txt");
        write_atomic(&p, b"hello").unwrap();
        write_atomic(&p, b"again").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"again");
        assert_eq!(names(&d.path().join("a")), ["b.txt"]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode();
            assert_ne!(mode & 0o044, 0, "readable by others as any output: {mode:o}");
        }
    }

    #[test]
    fn a_failed_writer_leaves_the_old_file_and_no_temporary() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.json");
        write_atomic(&p, b"old").unwrap();
        let err = write_atomic_with(&p, |w| {
            w.write_all(b"half")?;
            Err(std::io::Error::other("disk on fire"))
        })
        .unwrap_err();
        assert!(
            err.to_string().contains("x.json") && err.to_string().contains("disk on fire"),
            "{err}"
        );
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(names(d.path()), ["x.json"]);
    }

    #[test]
    fn an_atomic_dir_appears_only_on_commit() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("out");
        {
            let dir = AtomicDir::new(&dest).unwrap();
            std::fs::write(dir.path().join("f"), b"1").unwrap();
            assert!(!dest.exists());
            // dropped without a commit: nothing is left
        }
        assert!(names(d.path()).is_empty());
        let dir = AtomicDir::new(&dest).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/f"), b"2").unwrap();
        dir.commit().unwrap();
        assert_eq!(std::fs::read(dest.join("sub/f")).unwrap(), b"2");
        assert_eq!(names(d.path()), ["out"]);

        // A copy appears whole, and never over an existing folder.
        let copy = d.path().join("copy");
        copy_dir_atomic(&dest, &copy).unwrap();
        assert_eq!(std::fs::read(copy.join("sub/f")).unwrap(), b"2");
        assert!(copy_dir_atomic(&dest, &copy).is_err());
        assert_eq!(names(d.path()), ["copy", "out"]);
    }
}
