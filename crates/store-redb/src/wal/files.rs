//! The seam under the log: the two segment files as [`LogFiles`], so that crash tests can put
//! a disk underneath that keeps only what was synced ([`OsFiles`] is the real one).
//!
//! Everything the log does to its files goes through here: create, read, write in place,
//! `fdatasync`. A test implementation decides what a power loss keeps of what was written after
//! the last sync (nothing, or a torn prefix), which is what the log's recovery must cope with.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

/// One segment file.
pub trait LogFile: Send + Sync {
    /// The file's length in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Fills `buf` from `offset`; fails if the file ends before.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset` (not durable until [`sync_data`](Self::sync_data)).
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes everything written so far durable.
    fn sync_data(&self) -> io::Result<()>;
}

/// Where the segment files live.
pub trait LogFiles: Send + Sync {
    /// Whether the file `name` exists.
    fn exists(&self, name: &str) -> io::Result<bool>;
    /// Opens `name` for reading and writing, creating it empty if `create` and it is missing.
    fn open(&self, name: &str, create: bool) -> io::Result<Box<dyn LogFile>>;
    /// Makes the creation of files durable (their directory entries).
    fn sync_dir(&self) -> io::Result<()>;
    /// How `name` is shown in messages (its path).
    fn show(&self, name: &str) -> String;
}

/// The files of a directory on the real disk.
pub struct OsFiles {
    pub dir: PathBuf,
}

impl LogFile for File {
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }
}

impl LogFiles for OsFiles {
    fn exists(&self, name: &str) -> io::Result<bool> {
        self.dir.join(name).try_exists()
    }
    fn open(&self, name: &str, create: bool) -> io::Result<Box<dyn LogFile>> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(self.dir.join(name))?;
        Ok(Box::new(file))
    }
    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }
    fn show(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}
