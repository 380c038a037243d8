//! CPU time of the processes that serve a run: the server the bench started, and processes of
//! the system's own known by name (PostgreSQL's backends, `nats-server`, `mosquitto`), read
//! from `/proc` before and after the measured part, so that a row can say what a delivered
//! message cost in CPU, not only how fast it went.

use std::collections::HashMap;

/// CPU time (user + system, in microseconds) of each process of a group, by pid.
#[derive(Clone, Debug, Default)]
pub struct Sample(HashMap<u32, u64>);

/// CPU microseconds used by `pid` so far.
fn cpu_us(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (in parentheses, which may hold spaces): utime is the 12th,
    // stime the 13th, in clock ticks.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some((utime + stime) * 1_000_000 / hz)
}

/// The pids of the processes whose command is `name`.
fn pids_named(name: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim_end() == name)
        })
        .collect()
}

/// Where a group's processes are: one pid, or every process of a name.
#[derive(Clone, Debug)]
pub enum Procs {
    Pid(u32),
    Named(&'static str),
}

impl Procs {
    pub fn sample(&self) -> Sample {
        let pids = match self {
            Procs::Pid(p) => vec![*p],
            Procs::Named(n) => pids_named(n),
        };
        Sample(
            pids.into_iter()
                .filter_map(|p| Some((p, cpu_us(p)?)))
                .collect(),
        )
    }
}

/// CPU microseconds the group used from `before` to `after`: processes in both count their
/// difference, processes started in between all of theirs (those that ended in between are
/// not seen).
pub fn used_us(before: &Sample, after: &Sample) -> u64 {
    after
        .0
        .iter()
        .map(|(pid, t)| t.saturating_sub(before.0.get(pid).copied().unwrap_or(0)))
        .sum()
}
