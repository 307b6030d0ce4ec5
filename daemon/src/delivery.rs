//! Delivery: persist → fan out on the write path, and the per-connection pump that turns a
//! user's inbox into an ordered, gap-free, duplicate-free stream of `Delivery` frames.
//!
//! The pump's one invariant: it sends seq `last + 1` next, for the `last` it sent before.
//! Everything else follows from it:
//! - On sign-in the hub registration happens first, then the pump reads the store after the
//!   device's cursor; an entry committed meanwhile is in the store read, in the live queue, or
//!   both, and the seq check drops the second copy.
//! - A live entry above `last + 1` means something is missing between (pushes from two
//!   senders can overtake each other, or the queue overflowed): the pump reads the gap from the
//!   store, where it is already committed (seq order is commit order), then goes on.
//! - A connection marked lagging by the hub (its queue was full) catches up from the store page
//!   by page at the pace its socket accepts, clears the mark, and reads once more to cover the
//!   window in which live pushes were skipped. Memory stays bounded by the queue and one page.

use std::collections::BTreeMap;
use std::sync::Arc;

use messenger_protocol::pb;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::hub::{ConnHandle, LiveQueue};
use crate::metrics;
use crate::model::{Appended, InboxEntry, NewMessage, Seq};
use crate::state::Shared;
use crate::store::StoreResult;
use crate::writer::Outbound;

/// Inbox entries read per store round trip while catching up (and at most
/// `memory.catch_up_page_bytes` of bodies).
const CATCH_UP_PAGE: usize = 128;

/// Stores a message, then offers each recipient's inbox entry to their live connections.
/// Returns after the store has made it durable; pushes never block.
pub async fn accept(shared: &Shared, message: NewMessage) -> StoreResult<Appended> {
    let appended =
        metrics::timed_store("append_message", shared.store.append_message(message)).await?;
    if !appended.duplicate {
        metrics::message_accepted();
        for (user, seq) in &appended.entries {
            shared.hub.push(
                *user,
                &InboxEntry {
                    seq: *seq,
                    message: appended.message.clone(),
                },
            );
        }
        if let Some(cluster) = &shared.cluster {
            cluster.route(&appended);
        }
    }
    Ok(appended)
}

struct Pump {
    shared: Arc<Shared>,
    handle: Arc<ConnHandle>,
    out: Outbound,
    last: Seq,
}

/// Runs until the connection ends. Store failures close the connection (`closing`), since
/// a stream with a hole must not go on; the device resumes from its cursor.
pub async fn pump(
    shared: Arc<Shared>,
    handle: Arc<ConnHandle>,
    mut live: LiveQueue,
    acked: Seq,
    out: Outbound,
    closing: CancellationToken,
) {
    let mut pump = Pump {
        shared,
        handle,
        out,
        last: acked,
    };
    if let Err(e) = pump.run(&mut live).await {
        match e {
            PumpEnd::Closed => {}
            PumpEnd::Store(e) => {
                warn!(error = %e, "delivery stopped: store read failed");
                closing.cancel();
            }
        }
    }
}

enum PumpEnd {
    /// The connection's writer is gone.
    Closed,
    Store(crate::store::StoreError),
}

impl Pump {
    async fn run(&mut self, live: &mut LiveQueue) -> Result<(), PumpEnd> {
        self.catch_up(None).await?;
        loop {
            let entry = tokio::select! {
                entry = live.recv() => match entry {
                    Some(entry) => entry,
                    None => return Ok(()),
                },
                () = self.handle.catch_up_requested() => {
                    self.catch_up(None).await?;
                    continue;
                }
            };
            if entry.seq > Seq(self.last.0 + 1) {
                // Usually the missing entry is a push from another sender's task that is a
                // moment behind: let it land and take everything queued, in seq order, before
                // paying for a store read.
                tokio::task::yield_now().await;
                let mut queued = BTreeMap::from([(entry.seq, entry)]);
                while let Ok(e) = live.try_recv() {
                    queued.insert(e.seq, e);
                }
                for e in queued.into_values() {
                    self.deliver_live(&e).await?;
                }
            } else {
                self.deliver_live(&entry).await?;
            }
            if self.handle.is_lagging() {
                self.catch_up(None).await?;
                self.handle.clear_lagging();
                // Pushes skipped between the last read and clearing the mark are in the store.
                self.catch_up(None).await?;
            }
        }
    }

    /// One live entry: skipped if already sent, the hole before it read from the store (where
    /// it is committed: seq order is commit order), then sent.
    async fn deliver_live(&mut self, entry: &InboxEntry) -> Result<(), PumpEnd> {
        if entry.seq > Seq(self.last.0 + 1) {
            self.catch_up(Some(entry.seq)).await?;
        }
        if entry.seq == Seq(self.last.0 + 1) {
            self.send(entry).await?;
        }
        Ok(())
    }

    /// Sends stored entries after `last`: up to and including `until`, or all of them.
    async fn catch_up(&mut self, until: Option<Seq>) -> Result<(), PumpEnd> {
        let max_bytes = self.shared.config.memory.catch_up_page_bytes;
        // A page ends with the message that reaches the byte bound: at most one body more.
        let reserve = max_bytes.saturating_add(self.shared.config.limits.max_body_bytes);
        loop {
            // The page is charged to the memory budget while it is held: thousands of stalled
            // readers catching up must not hold a page each beyond the budget.
            let mut charge = self
                .out
                .memory()
                .charge_read(reserve)
                .await
                .map_err(|_| PumpEnd::Closed)?;
            metrics::catch_up_read();
            let page = metrics::timed_store(
                "read_inbox",
                self.shared
                    .store
                    .read_inbox(self.handle.user, self.last, CATCH_UP_PAGE, max_bytes),
            )
            .await
            .map_err(PumpEnd::Store)?;
            // A page cut by either bound may have more behind it.
            let bytes: usize = page.iter().map(|e| e.message.body.len()).sum();
            charge.shrink_to(bytes);
            let full = page.len() == CATCH_UP_PAGE || bytes >= max_bytes;
            for entry in &page {
                if until.is_some_and(|u| entry.seq > u) {
                    return Ok(());
                }
                if entry.seq > self.last {
                    self.send(entry).await?;
                }
            }
            if !full || until.is_some_and(|u| self.last >= u) {
                return Ok(());
            }
        }
    }

    async fn send(&mut self, entry: &InboxEntry) -> Result<(), PumpEnd> {
        let frame = pb::ServerFrame {
            request_id: 0,
            kind: Some(pb::server_frame::Kind::Delivery(pb::Delivery::from(entry))),
        };
        self.out.send(&frame).await.map_err(|_| PumpEnd::Closed)?;
        self.last = entry.seq;
        metrics::delivered(1);
        Ok(())
    }
}
