//! The progress bar shown on standard error while a run goes (hidden when stderr is not a
//! terminal, so logs and `--json` output stay clean).

use indicatif::{ProgressBar, ProgressStyle};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Units counted locally before the bar is moved: moving it takes a lock and reads the clock,
/// which per message would cost the measured system CPU it shares.
const CHUNK: u64 = 256;

#[derive(Clone)]
pub struct Progress(ProgressBar, Arc<AtomicU64>);

impl Progress {
    /// A bar counting to `total` with `label` in front.
    pub fn new(label: &str, total: u64) -> Self {
        let bar = ProgressBar::new(total);
        if let Ok(style) =
            ProgressStyle::with_template("{prefix:>28} [{bar:30}] {pos}/{len} {per_sec} {elapsed}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix(label.to_string());
        Progress(bar, Arc::new(AtomicU64::new(0)))
    }

    /// `n` more units done (callable from any task); the bar moves every [`CHUNK`] units.
    pub fn inc(&self, n: u64) {
        let counted = self.1.fetch_add(n, Ordering::Relaxed) + n;
        if counted >= CHUNK {
            let take = self.1.swap(0, Ordering::Relaxed);
            self.0.inc(take);
        }
    }

    pub fn finish(&self) {
        self.0.inc(self.1.swap(0, Ordering::Relaxed));
        self.0.finish_and_clear();
    }
}
