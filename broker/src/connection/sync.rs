//! Session writes of a connected session: one at a time, in order, and the
//! packets held until the state that promises them is in Kafka.

use super::*;

impl<S: AsyncRead + AsyncWrite + Send + 'static> Conn<S> {
    pub(super) fn record(&self, online: bool) -> SessionRecord {
        SessionRecord::from_session(
            &self.session,
            &self.node.config().node_id,
            self.session.epoch,
            online,
            now_ms(),
        )
    }

    /// Asks for the session to be written to Kafka (when persistent). All
    /// writes of a connected session go through `start_sync`, one at a time,
    /// so an older snapshot can never land after a newer one.
    pub(super) fn persist_soon(&mut self) {
        self.sync_wanted = self.session.expiry_s > 0;
        self.dirty = false;
    }

    /// Sends `p`, or holds it until the session state is in Kafka when
    /// `needs_sync` (a QoS 2 step that must survive a crash of this node) or
    /// when earlier packets are held (order [MQTT-4.6.0]).
    pub(super) fn emit(&mut self, p: Packet, needs_sync: bool) {
        let needs_sync = needs_sync && self.session.expiry_s > 0;
        if !needs_sync && !self.holding() {
            self.io.send(&p);
            return;
        }
        self.held.push(p);
        self.held_needs_sync |= needs_sync;
    }

    /// Earlier packets wait for a session write: later ones queue behind
    /// them [MQTT-4.6.0].
    pub(super) fn holding(&self) -> bool {
        !self.held.is_empty() || self.syncing.as_ref().is_some_and(|s| !s.packets.is_empty())
    }

    pub(super) fn held_len(&self) -> usize {
        self.held.len() + self.syncing.as_ref().map_or(0, |s| s.packets.len())
    }

    /// Starts the next session write if one is needed and none is running;
    /// releases held packets that need none.
    pub(super) fn start_sync(&mut self) {
        if self.syncing.is_some() {
            return;
        }
        let exposed = self.unsaved + self.landed_outbound;
        if self.acked_since_sync >= PERSIST_AFTER_ACKS
            || (self.unsaved_max > 0
                && exposed >= self.unsaved_max.div_ceil(2)
                && (self.acked_since_sync > 0 || self.unsaved > 0))
        {
            self.sync_wanted |= self.session.expiry_s > 0;
        }
        if !self.held_needs_sync && !self.sync_wanted {
            for p in std::mem::take(&mut self.held) {
                self.io.send(&p);
            }
            return;
        }
        let rec = self.record(true);
        let node = self.node.clone();
        let write = Box::pin(async move {
            // Kafka is the truth: until the state is written, the packets
            // that depend on it wait (the client sees a slow broker).
            let mut wait = Duration::from_millis(500);
            while let Err(e) = node.persist(rec.clone()).await {
                tracing::warn!(client_id = %rec.client_id, error = %e, "session write failed; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(10));
            }
        });
        self.syncing = Some(Syncing {
            write,
            packets: std::mem::take(&mut self.held),
            covers: self.unsaved,
            outbound: self.session.outbound.len(),
        });
        self.held_needs_sync = false;
        self.sync_wanted = false;
        self.dirty = false;
        self.acked_since_sync = 0;
    }

    pub(super) fn on_synced(&mut self) {
        if let Some(s) = self.syncing.take() {
            self.unsaved = self.unsaved.saturating_sub(s.covers);
            self.landed_outbound = s.outbound;
            for p in s.packets {
                self.io.send(&p);
            }
        }
    }
}
