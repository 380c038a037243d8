//! The simulated network: one [`Conn`] per WebSocket connection, with the frames in flight in
//! each direction, and the ways it fails: latency, loss, duplication and reordering of frames,
//! a cut (both ends notice after a while), and a partition (a device cut off from the server
//! for seconds: its live connections stall, and die if the partition outlasts a ping timeout;
//! its reconnects fail until it ends).
//!
//! A connection keeps TCP's promises unless a fault profile says otherwise: frames arrive in
//! the order they were sent, and what a client process wrote before it was killed still
//! reaches the server (the kernel flushes it before closing), while a cut or a crashed server
//! loses whatever was in flight.

use crate::world::Sim;
use ordo_core::SessionId;
use ordo_protocol::{ClientFrame, ServerFrame};

/// One connection. Frames are `(arrival time, wire order, frame)`.
pub struct Conn {
    pub dev: usize,
    /// The server process this connection was made to.
    pub incarnation: u64,
    /// Both ends can still send on it.
    pub alive: bool,
    /// The client's process died, but what it wrote before is still on its way to the server.
    pub drain_c2s: bool,
    pub c2s: Vec<(u64, u64, ClientFrame)>,
    pub s2c: Vec<(u64, u64, ServerFrame)>,
    pub c2s_last: u64,
    pub s2c_last: u64,
    /// When each end notices the connection is gone.
    pub client_detect: Option<u64>,
    pub server_detect: Option<u64>,
    /// The server is reading a page for this connection's `sync`: it takes the connection's
    /// next frame only once the page is served, as the server's connection task does.
    pub reading: bool,
}

impl Conn {
    pub fn new(dev: usize, incarnation: u64, now: u64) -> Conn {
        Conn {
            dev,
            incarnation,
            alive: true,
            drain_c2s: false,
            c2s: Vec::new(),
            s2c: Vec::new(),
            c2s_last: now,
            s2c_last: now,
            client_detect: None,
            server_detect: None,
            reading: false,
        }
    }

    /// Nothing more gets through, either way.
    pub fn close(&mut self) {
        self.alive = false;
        self.drain_c2s = false;
    }

    /// The next client frame to arrive, while frames are held until `held` (a partition).
    pub fn next_c2s(&self, held: u64) -> Option<usize> {
        (0..self.c2s.len()).min_by_key(|&i| (self.c2s[i].0.max(held), self.c2s[i].0, self.c2s[i].1))
    }

    pub fn next_s2c(&self, held: u64) -> Option<usize> {
        (0..self.s2c.len()).min_by_key(|&i| (self.s2c[i].0.max(held), self.s2c[i].0, self.s2c[i].1))
    }

    /// When the last client frame still in flight arrives.
    pub fn c2s_done(&self, held: u64) -> u64 {
        self.c2s.iter().map(|f| f.0.max(held)).max().unwrap_or(0)
    }
}

/// A frame to a client, written short for the trace.
pub fn short_s(f: &ServerFrame) -> String {
    match f {
        ServerFrame::Welcome { .. } => "welcome".into(),
        ServerFrame::Accepted {
            cmid, conv, seq, ..
        } => format!("accepted {cmid} {conv}/{seq}"),
        ServerFrame::Rejected {
            cmid,
            code,
            message,
            ..
        } => format!("rejected {cmid} {code} {message}"),
        ServerFrame::Msg(m) => format!("msg {}/{} {}", m.conv, m.seq, m.cmid),
        ServerFrame::Notify { conv, max_seq } => format!("notify {conv}<={max_seq}"),
        ServerFrame::Synced {
            conv,
            messages,
            has_more,
            max_seq,
            first_seq,
            ..
        } => format!(
            "synced {conv} {:?} more={has_more} first={first_seq} max={max_seq}",
            messages.iter().map(|m| m.seq).collect::<Vec<_>>()
        ),
        ServerFrame::Receipt {
            conv,
            user,
            delivered,
            read,
        } => format!("receipt {conv} {user} d={delivered} r={read}"),
        ServerFrame::Convs {
            conversations,
            has_more,
        } => format!(
            "convs {:?}{}",
            conversations
                .iter()
                .map(|c| (c.conv.as_str(), c.max_seq, c.delivered))
                .collect::<Vec<_>>(),
            if *has_more { " (more)" } else { "" }
        ),
        ServerFrame::Error { code, message, .. } => format!("error {code}: {message}"),
        ServerFrame::Pong { .. } => "pong".into(),
    }
}

/// A frame to the server, written short for the trace: `send <cmid>`, `ack team:3 ops:1`,
/// `sync team>2`, `read team:3`, `convs`.
pub fn short(f: &ClientFrame) -> String {
    match f {
        ClientFrame::Send { cmid, .. } => format!("send {cmid}"),
        ClientFrame::Ack { acks } => {
            let parts: Vec<String> = acks
                .iter()
                .map(|p| format!("{}:{}", p.conv, p.seq))
                .collect();
            format!("ack {}", parts.join(" "))
        }
        ClientFrame::Read { conv, seq } => format!("read {conv}:{seq}"),
        ClientFrame::Sync { conv, after, .. } => format!("sync {conv}>{after}"),
        ClientFrame::Convs { after, .. } => match after {
            Some(a) => format!("convs >{a}"),
            None => "convs".into(),
        },
        ClientFrame::Ping { .. } => "ping".into(),
    }
}

impl Sim {
    pub(crate) fn send_to_client(&mut self, sid: SessionId, f: ServerFrame) {
        let now = self.now;
        let faults = self.faults_on;
        let lat = self.rng.range(self.plan.latency);
        let drop = faults && self.rng.chance(self.plan.s2c_drop);
        let reorder = faults && self.rng.chance(self.plan.s2c_reorder);
        let dup = faults && self.rng.chance(self.plan.s2c_dup);
        let extra = self.rng.range((0, 300));
        let Some(c) = self.conns.get_mut(&sid).filter(|c| c.alive) else {
            return;
        };
        if drop {
            self.stats.dropped += 1;
            tr!(self, "lost: {}", short_s(&f));
            return;
        }
        let at = if reorder {
            self.stats.reordered += 1;
            now + lat
        } else {
            c.s2c_last = c.s2c_last.max(now + lat);
            c.s2c_last
        };
        self.wire_no += 1;
        if dup {
            self.stats.duplicated += 1;
            c.s2c.push((at + extra, self.wire_no, f.clone()));
            self.wire_no += 1;
        }
        c.s2c.push((at, self.wire_no, f));
    }

    pub(crate) fn send_to_server(&mut self, sid: SessionId, f: ClientFrame) {
        let now = self.now;
        let faults = self.faults_on;
        let lat = self.rng.range(self.plan.latency);
        let reorder = faults
            && !matches!(f, ClientFrame::Send { .. })
            && self.rng.chance(self.plan.c2s_reorder);
        let dup = faults && self.rng.chance(self.plan.c2s_dup);
        let extra = self.rng.range((0, 300));
        let Some(c) = self.conns.get_mut(&sid).filter(|c| c.alive) else {
            return;
        };
        let at = if reorder {
            self.stats.reordered += 1;
            now + lat
        } else {
            c.c2s_last = c.c2s_last.max(now + lat);
            c.c2s_last
        };
        self.wire_no += 1;
        if dup {
            // The copy arrives after the original: TCP never delivers a send twice, but a
            // client resend racing its original is the same thing for the server.
            self.stats.duplicated += 1;
            c.c2s.push((at + extra, self.wire_no + 1, f.clone()));
        }
        c.c2s.push((at, self.wire_no, f));
        self.wire_no += 1;
    }

    /// The connection breaks (a NAT timeout, a proxy restart): what is in flight is lost, and
    /// each end notices on its own time.
    pub(crate) fn cut(&mut self, sid: SessionId) {
        let now = self.now;
        let a = self.rng.range((1, 400));
        let b = self.rng.range((1, 1_500));
        if let Some(c) = self.conns.get_mut(&sid) {
            c.close();
            c.client_detect = Some(now + a);
            c.server_detect = Some(now + b);
            self.stats.cuts += 1;
            tr!(self, "cut connection {sid}");
        }
    }

    /// `devs` lose their network for `ms`. A live connection stalls: frames wait until the
    /// partition ends, unless an end's ping timeout runs out first, which kills the
    /// connection (the other end notices when the partition ends, or on its own timeout).
    /// Connection attempts fail until it ends (see [`Sim::connect`]).
    pub(crate) fn partition(&mut self, devs: &[usize], ms: u64) {
        let now = self.now;
        let end = now + ms;
        self.stats.partitions += 1;
        let names: Vec<String> = devs.iter().map(|d| self.name(*d)).collect();
        tr!(self, "PARTITION: {names:?} cut off for {ms} ms");
        for &d in devs {
            self.devs[d].cut_off_until = self.devs[d].cut_off_until.max(end);
        }
        let sids: Vec<SessionId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.alive && devs.contains(&c.dev))
            .map(|(s, _)| *s)
            .collect();
        for sid in sids {
            let client_timeout = now + self.rng.range((2_000, 10_000));
            let server_timeout = now + self.rng.range((3_000, 15_000));
            let after = end + self.rng.range((1, 50));
            if client_timeout >= end && server_timeout >= end {
                continue; // it survives: its frames flow again when the partition ends
            }
            self.stats.partition_timeouts += 1;
            if let Some(c) = self.conns.get_mut(&sid) {
                c.close();
                c.client_detect = Some(if client_timeout < end {
                    client_timeout
                } else {
                    after
                });
                c.server_detect = Some(if server_timeout < end {
                    server_timeout
                } else {
                    after
                });
            }
            tr!(self, "connection {sid} will time out");
        }
    }

    /// Drops a connection both ends are done with.
    pub(crate) fn forget_dead(&mut self, sid: SessionId) {
        if self.conns.get(&sid).is_some_and(|c| {
            !c.alive && !c.drain_c2s && c.client_detect.is_none() && c.server_detect.is_none()
        }) {
            self.conns.remove(&sid);
        }
    }
}
