//! The progress bar shown on standard error while a run goes (hidden when stderr is not a
//! terminal, so logs and `--json` output stay clean).

use indicatif::{ProgressBar, ProgressStyle};

#[derive(Clone)]
pub struct Progress(ProgressBar);

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
        Progress(bar)
    }

    /// One more unit done (callable from any task).
    pub fn inc(&self, n: u64) {
        self.0.inc(n);
    }

    pub fn finish(&self) {
        self.0.finish_and_clear();
    }
}
