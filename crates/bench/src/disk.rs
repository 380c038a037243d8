//! The disk's own commit latency: write 4 KiB in place in a preallocated file, then
//! `fdatasync`, many times. An Ordo message is delivered only after it is durable, so this is the
//! floor under Ordo's delivery latency; `pairs --rate` measures it in the server's data directory
//! in the same run.

use super::report::{Latency, Summary};
use super::{fail, BenchError};
use clap::Args;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

#[derive(Args)]
pub struct DiskArgs {
    /// Directory on the disk to measure (a temporary file is created and removed there).
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// Write + fdatasync rounds.
    #[arg(long, default_value_t = 2000)]
    count: usize,
    #[arg(long)]
    json: bool,
}

/// Size of the file written in place (preallocated, so fdatasync need not write its size).
const FILE_BYTES: u64 = 4 << 20;
const BLOCK: usize = 4096;

/// Measures `count` rounds of a 4 KiB write and `fdatasync` in `dir`.
pub fn probe(dir: &Path, count: usize) -> Result<Summary, BenchError> {
    let file = tempfile::tempfile_in(dir)
        .map_err(fail(&format!("cannot create a file in {}", dir.display())))?;
    file.set_len(FILE_BYTES)
        .map_err(fail("cannot size the probe file"))?;
    let block = vec![0xa5u8; BLOCK];
    for off in (0..FILE_BYTES).step_by(BLOCK) {
        file.write_all_at(&block, off)
            .map_err(fail("cannot write"))?;
    }
    file.sync_all().map_err(fail("cannot sync"))?;
    let mut lat = Latency::default();
    let blocks = FILE_BYTES / BLOCK as u64;
    for i in 0..count as u64 {
        let t = Instant::now();
        file.write_all_at(&block, (i % blocks) * BLOCK as u64)
            .map_err(fail("cannot write"))?;
        file.sync_data().map_err(fail("fdatasync failed"))?;
        lat.record(t.elapsed());
    }
    lat.summary()
        .ok_or_else(|| BenchError("--count must be at least 1".into()))
}

pub fn run(a: DiskArgs) -> ExitCode {
    match probe(&a.dir, a.count) {
        Ok(s) => {
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({"scenario": "disk", "fdatasync_ms": s})
                );
            } else {
                println!(
                    "4 KiB write + fdatasync in {} ({} rounds), ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
                    a.dir.display(),
                    s.count,
                    s.p50,
                    s.p90,
                    s.p99,
                    s.p999,
                    s.max
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ordo-bench disk: {e}");
            ExitCode::FAILURE
        }
    }
}
