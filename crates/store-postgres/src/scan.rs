//! The dedup scan ([`ordo_store::Store::dedup_scan`]) of the PostgreSQL store: every dedup entry
//! accepted at or after the store's cutoff, page by page, for a restarted server's filter. The
//! messages come first, each its own entry; then the entries kept on their own (`ordo_dedup`,
//! small), by their index on time. In that order because entries move only the other way: a
//! trim keeps the entries of the messages it deletes in `ordo_dedup`, so an entry moved while
//! the scan runs is found in one place or the other, never missed.
//!
//! Messages are found by time through a BRIN index (a few bytes per range of pages, nearly free
//! to keep up as messages are appended in time order), which cannot hand rows over in order:
//! the scan reads them in slices of time, each sorted. A slice that fills a page is read on
//! from its last entry, in a slice as wide as the time that page spanned; one that does not,
//! the next is twice as wide. The messages end past the newest acceptance time the store had
//! when the scan started (what is committed later is new to the filter anyway).

use crate::{db, dedup_of, i};
use ordo_core::DedupRecord;
use ordo_store::{DedupScan, ScanFrom, StoreError};
use postgres::Client;

/// The first slice of messages, in ms; slices double from there while they hold less than a
/// page.
const FIRST_SLICE_MS: u64 = 60_000;
const MAX_SLICE_MS: u64 = 1 << 40;

/// Where a dedup scan goes on.
#[derive(serde::Serialize, serde::Deserialize)]
enum ScanAt {
    /// In the messages: the slice of time `from..from + width`, after (ts, conv, seq) in it,
    /// until `end`.
    Messages {
        from: u64,
        width: u64,
        after: (u64, String, u64),
        end: u64,
    },
    /// In the entries kept on their own, after (ts, user, cmid).
    Kept(u64, String, String),
}

/// One page of the scan from `from`, about `max` entries, none accepted before `cutoff`.
pub(crate) fn page(
    c: &mut Client,
    from: Option<ScanFrom>,
    max: usize,
    cutoff: u64,
) -> Result<DedupScan, StoreError> {
    let at = match &from {
        None => {
            let end: i64 = c
                .query_one("SELECT COALESCE(MAX(last_ts), 0) FROM ordo_writers", &[])
                .map_err(db("scanning dedup entries"))?
                .get(0);
            ScanAt::Messages {
                from: cutoff,
                width: FIRST_SLICE_MS,
                after: (0, String::new(), 0),
                end: end.max(0) as u64,
            }
        }
        Some(ScanFrom(raw)) => {
            serde_json::from_slice::<ScanAt>(raw).map_err(|e| StoreError::Engine {
                context: "dedup scan".into(),
                source: format!("a scan position this store did not make: {e}").into(),
            })?
        }
    };
    let max = max.max(1);
    let limit = i(max as u64);
    let (entries, next) = match at {
        ScanAt::Messages {
            from,
            width,
            after,
            end,
        } => {
            let to = from.saturating_add(width);
            let rows = c
                .query(
                    "SELECT from_user, cmid, conv, seq, ts FROM ordo_messages
                     WHERE ts >= $1::int8 AND ts < $2::int8
                       AND (ts, conv, seq) > ($3::int8, $4::text, $5::int8)
                     ORDER BY ts, conv, seq LIMIT $6",
                    &[&i(from), &i(to), &i(after.0), &after.1, &i(after.2), &limit],
                )
                .map_err(db("scanning dedup entries"))?;
            let entries: Vec<DedupRecord> = rows.iter().map(dedup_of).collect();
            let next = match entries.last() {
                // The slice holds more: read on from the last entry, in a slice as wide as the
                // time this page spanned (a page's worth, about).
                Some(d) if entries.len() >= max => ScanAt::Messages {
                    from: d.ts,
                    width: d.ts.saturating_sub(from).clamp(1, width),
                    after: (d.ts, d.conv.clone(), d.seq),
                    end,
                },
                // The messages are done: on to the entries kept on their own.
                _ if to > end => ScanAt::Kept(0, String::new(), String::new()),
                _ => ScanAt::Messages {
                    from: to,
                    width: (width * 2).min(MAX_SLICE_MS),
                    after: (0, String::new(), 0),
                    end,
                },
            };
            (entries, Some(next))
        }
        ScanAt::Kept(ts, user, cmid) => {
            let rows = c
                .query(
                    "SELECT user_id, cmid, conv, seq, ts FROM ordo_dedup
                     WHERE ts >= $5::int8 AND (ts, user_id, cmid) > ($1::int8, $2::text, $3::text)
                     ORDER BY ts, user_id, cmid LIMIT $4",
                    &[&i(ts), &user, &cmid, &limit, &i(cutoff)],
                )
                .map_err(db("scanning dedup entries"))?;
            let entries: Vec<DedupRecord> = rows.iter().map(dedup_of).collect();
            let next = match entries.last() {
                Some(d) if entries.len() >= max => {
                    Some(ScanAt::Kept(d.ts, d.user.clone(), d.cmid.clone()))
                }
                _ => None,
            };
            (entries, next)
        }
    };
    let next = next.map(|n| ScanFrom(serde_json::to_vec(&n).unwrap_or_default()));
    Ok(DedupScan { entries, next })
}
