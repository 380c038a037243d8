//! Power loss under the log: the segment files live on a disk that keeps only what was synced
//! (the log's files seam, [`LogFiles`]), and loses power at a chosen sync, keeping any prefix
//! of the write it was making. Whatever the moment, the store opens again (a torn last record
//! is the one thing it drops), every batch whose commit returned is there, nothing is there
//! twice, and numbering goes on without a hole.

mod common;

use common::{batch, seqs};
use ordo_store::Store;
use ordo_store_redb::wal::files::{LogFile, LogFiles};
use ordo_store_redb::RedbStore;
use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// One file: what survives a power loss, and the writes since the last sync.
#[derive(Default)]
struct FileState {
    durable: Vec<u8>,
    pending: Vec<(u64, Vec<u8>)>,
}

impl FileState {
    /// Its length as a reader sees it.
    fn len(&self) -> usize {
        let written = self.pending.iter().map(|(o, d)| *o as usize + d.len());
        written.fold(self.durable.len(), usize::max)
    }

    /// Reads as a reader sees it: the durable bytes with the pending writes over them.
    fn read(&self, buf: &mut [u8], offset: usize) -> bool {
        if offset + buf.len() > self.len() {
            return false;
        }
        buf.fill(0);
        let end = offset + buf.len();
        let from_durable = end.min(self.durable.len());
        if offset < from_durable {
            buf[..from_durable - offset].copy_from_slice(&self.durable[offset..from_durable]);
        }
        for (o, d) in &self.pending {
            let (o, e) = (*o as usize, *o as usize + d.len());
            let (lo, hi) = (o.max(offset), e.min(end));
            if lo < hi {
                buf[lo - offset..hi - offset].copy_from_slice(&d[lo - o..hi - o]);
            }
        }
        true
    }
}

fn put(b: &mut Vec<u8>, off: u64, data: &[u8]) {
    let end = off as usize + data.len();
    if b.len() < end {
        b.resize(end, 0);
    }
    b[off as usize..end].copy_from_slice(data);
}

/// The disk: files by name, and a fuse that blows at the `fuse`-th sync (counting from 1).
struct Disk {
    files: Mutex<HashMap<String, Arc<Mutex<FileState>>>>,
    syncs: Mutex<u64>,
    fuse: Option<u64>,
    /// Set once the power is gone: every write and sync fails from then on.
    dead: Mutex<bool>,
}

struct DiskFile {
    disk: Arc<Disk>,
    state: Arc<Mutex<FileState>>,
}

fn power_gone() -> io::Error {
    io::Error::other("the power is gone")
}

impl Disk {
    fn new(fuse: Option<u64>) -> Arc<Disk> {
        Arc::new(Disk {
            files: Mutex::default(),
            syncs: Mutex::new(0),
            fuse,
            dead: Mutex::new(false),
        })
    }

    /// What the disk holds after the power came back: the durable bytes of each file, and of
    /// its writes since the last sync, the first whole and `torn` bytes of the next.
    fn after_power_loss(&self, torn: usize) -> Arc<Disk> {
        let next = Disk::new(None);
        for (name, f) in self.files.lock().unwrap().iter() {
            let f = f.lock().unwrap();
            let mut durable = f.durable.clone();
            if let Some((off, data)) = f.pending.first() {
                put(&mut durable, *off, &data[..torn.min(data.len())]);
            }
            next.files.lock().unwrap().insert(
                name.clone(),
                Arc::new(Mutex::new(FileState {
                    durable,
                    pending: Vec::new(),
                })),
            );
        }
        next
    }
}

impl LogFile for DiskFile {
    fn size(&self) -> io::Result<u64> {
        Ok(self.state.lock().unwrap().len() as u64)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.state.lock().unwrap().read(buf, offset as usize) {
            Ok(())
        } else {
            Err(io::ErrorKind::UnexpectedEof.into())
        }
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if *self.disk.dead.lock().unwrap() {
            return Err(power_gone());
        }
        self.state
            .lock()
            .unwrap()
            .pending
            .push((offset, buf.to_vec()));
        Ok(())
    }
    fn sync_data(&self) -> io::Result<()> {
        let mut dead = self.disk.dead.lock().unwrap();
        if *dead {
            return Err(power_gone());
        }
        let mut n = self.disk.syncs.lock().unwrap();
        *n += 1;
        if Some(*n) == self.disk.fuse {
            *dead = true;
            return Err(power_gone());
        }
        let mut s = self.state.lock().unwrap();
        let pending = std::mem::take(&mut s.pending);
        for (off, data) in pending {
            put(&mut s.durable, off, &data);
        }
        Ok(())
    }
}

/// The seam's view of a [`Disk`].
struct Files(Arc<Disk>);

impl LogFiles for Files {
    fn exists(&self, name: &str) -> io::Result<bool> {
        Ok(self.0.files.lock().unwrap().contains_key(name))
    }
    fn open(&self, name: &str, create: bool) -> io::Result<Box<dyn LogFile>> {
        let mut files = self.0.files.lock().unwrap();
        let state = match files.get(name) {
            Some(s) => s.clone(),
            None if create => files.entry(name.to_string()).or_default().clone(),
            None => return Err(io::ErrorKind::NotFound.into()),
        };
        Ok(Box::new(DiskFile {
            disk: self.0.clone(),
            state,
        }))
    }
    fn sync_dir(&self) -> io::Result<()> {
        Ok(())
    }
    fn show(&self, name: &str) -> String {
        format!("(power-loss disk)/{name}")
    }
}

const PER: u64 = 64;
const BODY: usize = 2048;

fn open(dir: &Path, disk: &Arc<Disk>) -> RedbStore {
    RedbStore::open_with_log(dir, 8 << 20, &Files(disk.clone())).unwrap()
}

/// Commits batches until the power goes; returns how many returned (were acknowledged).
fn run_until_power_loss(dir: &Path, disk: &Arc<Disk>) -> u64 {
    let store = open(dir, disk);
    let mut acked = 0;
    for n in 1.. {
        if store.commit(batch(n, PER, BODY).into()).is_err() {
            break;
        }
        acked = n;
    }
    acked
}

#[test]
fn every_acknowledged_batch_survives_a_power_loss_at_any_sync() {
    // Syncs 1 and 2 make the two segments; each batch is one sync (about 130 KiB, so writing
    // moves between the segments every ~64 batches). Tears: nothing of the write, part of its
    // header, part of its payload, all of it.
    let mut rng = 0x5eed_u64;
    for fuse in [3u64, 4, 5, 65, 66, 67, 68, 130, 131, 132] {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let torn = match fuse % 4 {
            0 => 0,
            1 => 7,
            2 => 20 + (rng >> 33) as usize % (PER as usize * BODY),
            _ => usize::MAX,
        };
        let dir = tempfile::tempdir().unwrap();
        let disk = Disk::new(Some(fuse));
        let acked = run_until_power_loss(dir.path(), &disk);
        assert_eq!(acked, fuse - 3, "fuse {fuse}: each batch is one sync");
        let after = disk.after_power_loss(torn);
        let store = open(dir.path(), &after);
        let got = seqs(&store);
        // The batch being written when the power went may be there whole, or not at all.
        let whole = (acked + 1) * PER;
        assert!(
            got == (1..=acked * PER).collect::<Vec<_>>() || got == (1..=whole).collect::<Vec<_>>(),
            "fuse {fuse}, torn {torn}: {} messages, acked {}",
            got.len(),
            acked * PER
        );
        // Numbering goes on from what is there, across another reopen.
        let next = got.len() as u64 / PER + 1;
        store.commit(batch(next, PER, BODY).into()).unwrap();
        drop(store);
        let store = open(dir.path(), &after);
        assert_eq!(
            seqs(&store),
            (1..=next * PER).collect::<Vec<_>>(),
            "fuse {fuse}"
        );
    }
}
