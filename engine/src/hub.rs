//! Live connections and fan-out. The hub maps each account to its live connections (an account
//! may have several devices) in a sharded `DashMap`; a connection here is only a bounded outbound
//! queue, never a socket. The shell's writer task drains a connection's queue and writes to the
//! socket, so a broadcast costs one short lock and a push per recipient and never waits on I/O.
//!
//! A message is rendered once and its bytes shared by every recipient; a `new_request`, which
//! differs per pharmacy only in `distance_km`, is a [`Template`] whose number is written between
//! the shared prefix and suffix as the frame is written, never re-serialised. A recipient whose
//! queue is full is marked slow: its queue takes nothing more, its writer flushes what is queued
//! and closes with 4008, and no other recipient waits for it.

use crate::model::{PharmacyId, UserId};
use bytes::Bytes;
use dashmap::DashMap;
use parking_lot::Mutex;
use rustc_hash::FxBuildHasher;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::Notify;

/// Who a message is for: every live connection of one account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Audience {
    /// A customer, by user id.
    Customer(UserId),
    /// A pharmacy, by pharmacy id.
    Pharmacy(PharmacyId),
}

/// Why and how a connection is being closed (WebSocket close code and reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Close {
    /// WebSocket close code.
    pub code: u16,
    /// Short reason sent in the close frame.
    pub reason: &'static str,
}

impl Close {
    /// The client did not read fast enough and its queue overflowed.
    pub const SLOW: Close = Close { code: 4008, reason: "slow consumer" };
    /// The pharmacy was suspended (or is not approved).
    pub const SUSPENDED: Close = Close { code: 4003, reason: "pharmacy not approved" };
    /// The server is shutting down.
    pub const SHUTDOWN: Close = Close { code: 1001, reason: "server shutting down" };
}

/// A pre-rendered JSON message with one number (`distance_km`) left open between two byte runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    prefix: Bytes,
    suffix: Bytes,
}

impl Template {
    /// Builds a template from the bytes before and after the number.
    pub fn new(prefix: Bytes, suffix: Bytes) -> Self {
        Template { prefix, suffix }
    }

    /// Writes the message with `number` in place, formatted as JSON (shortest round-trip form,
    /// `.0` kept on whole numbers, as serde_json writes an `f64`).
    pub fn write_to(&self, number: f64, out: &mut Vec<u8>) {
        out.reserve(self.prefix.len() + 24 + self.suffix.len());
        out.extend_from_slice(&self.prefix);
        write_json_number(number, out);
        out.extend_from_slice(&self.suffix);
    }

    /// The whole message with `number` in place.
    pub fn render(&self, number: f64) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(number, &mut out);
        out
    }
}

/// Writes `number` as serde_json writes an `f64`. Distances are rounded to hundredths for
/// display, and the shortest round-trip form of such a number is its two-decimal form without a
/// trailing zero (`.0` kept): those are written from integer hundredths, several times faster
/// than the general shortest-form algorithm (profiled at a third of a fan-out), which everything
/// else still goes through.
fn write_json_number(number: f64, out: &mut Vec<u8>) {
    if !number.is_finite() {
        out.extend_from_slice(b"null");
        return;
    }
    let hundredths = (number * 100.0).round();
    if number.is_sign_positive() && hundredths < 1e15 && hundredths / 100.0 == number {
        let hundredths = hundredths as u64;
        let (whole, frac) = (hundredths / 100, hundredths % 100);
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        let mut rest = whole;
        loop {
            at -= 1;
            digits[at] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        out.extend_from_slice(&digits[at..]);
        out.push(b'.');
        out.push(b'0' + (frac / 10) as u8);
        if frac % 10 != 0 {
            out.push(b'0' + (frac % 10) as u8);
        }
        return;
    }
    out.extend_from_slice(ryu::Buffer::new().format_finite(number).as_bytes());
}

/// One queued outbound message.
#[derive(Debug, Clone, PartialEq)]
pub enum Outbound {
    /// The same bytes for everyone.
    Shared(Bytes),
    /// A template and this recipient's number (already rounded for display).
    Patched(Arc<Template>, f64),
}

impl Outbound {
    /// Appends the message's JSON bytes to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        match self {
            Outbound::Shared(bytes) => out.extend_from_slice(bytes),
            Outbound::Patched(template, number) => template.write_to(*number, out),
        }
    }

    /// The message's JSON bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out);
        out
    }
}

/// Delivery to accounts, wherever their connections are. [`Hub`] delivers to this node's
/// connections; [`MemoryBus`] joins several hubs as a cross-node bus would (NATS, later).
pub trait Fanout: Send + Sync + 'static {
    /// Queues `msg` on every connection of `to`; returns how many connections took it.
    fn send(&self, to: Audience, msg: Outbound) -> usize;
    /// Queues the same bytes on every connection of every audience in `to`, in that order.
    fn send_each(&self, to: &[Audience], msg: &Bytes) -> usize {
        to.iter().map(|&who| self.send(who, Outbound::Shared(msg.clone()))).sum()
    }
    /// Queues `template` on every connection of each audience with that audience's number,
    /// in the order given (nearest first, for a broadcast).
    fn send_patched(&self, template: &Arc<Template>, to: &[(Audience, f64)]) -> usize {
        to.iter().map(|&(who, number)| self.send(who, Outbound::Patched(template.clone(), number))).sum()
    }
    /// Closes every connection of `to` with `close` once its queue is flushed.
    fn close(&self, to: Audience, close: Close);
}

struct OutboxState {
    frames: VecDeque<Outbound>,
    close: Option<Close>,
}

struct Outbox {
    id: u64,
    state: Mutex<OutboxState>,
    wake: Notify,
    capacity: usize,
}

impl Outbox {
    /// Queues `msg`. Returns false if the connection is closing or has just overflowed.
    fn push(&self, msg: Outbound, stats: &HubStats) -> bool {
        let mut state = self.state.lock();
        if state.close.is_some() {
            return false;
        }
        if state.frames.len() >= self.capacity {
            state.close = Some(Close::SLOW);
            drop(state);
            stats.slow_cuts.fetch_add(1, Ordering::Relaxed);
            self.wake.notify_one();
            return false;
        }
        let was_empty = state.frames.is_empty();
        state.frames.push_back(msg);
        drop(state);
        if was_empty {
            // The writer drains everything each time it wakes, so it only needs waking when the
            // queue goes from empty to non-empty.
            self.wake.notify_one();
        }
        true
    }

    fn close(&self, close: Close) {
        let mut state = self.state.lock();
        if state.close.is_none() {
            state.close = Some(close);
        }
        drop(state);
        self.wake.notify_one();
    }
}

/// Counters the operator view and `/metrics` read.
#[derive(Debug, Default)]
pub struct HubStats {
    /// Messages queued on a connection.
    pub enqueued: AtomicU64,
    /// Connections cut for overflowing their queue.
    pub slow_cuts: AtomicU64,
}

/// This node's live connections.
pub struct Hub {
    conns: DashMap<Audience, Vec<Arc<Outbox>>, FxBuildHasher>,
    queue_capacity: usize,
    next_id: AtomicU64,
    stats: HubStats,
}

impl Hub {
    /// A hub whose connections each queue at most `queue_capacity` messages.
    pub fn new(queue_capacity: usize) -> Arc<Hub> {
        Arc::new(Hub {
            conns: DashMap::with_hasher(FxBuildHasher),
            queue_capacity: queue_capacity.max(1),
            next_id: AtomicU64::new(1),
            stats: HubStats::default(),
        })
    }

    /// Registers a new connection for `who`. It receives messages from now on; dropping the
    /// subscription unregisters it.
    pub fn subscribe(self: &Arc<Self>, who: Audience) -> Subscription {
        let outbox = Arc::new(Outbox {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            state: Mutex::new(OutboxState { frames: VecDeque::new(), close: None }),
            wake: Notify::new(),
            capacity: self.queue_capacity,
        });
        self.conns.entry(who).or_default().push(outbox.clone());
        Subscription { hub: self.clone(), who, outbox }
    }

    /// Live connections of one account.
    pub fn connections(&self, who: Audience) -> usize {
        self.conns.get(&who).map_or(0, |c| c.len())
    }

    /// Live connections per kind: (customers, pharmacies).
    pub fn socket_counts(&self) -> (usize, usize) {
        let mut counts = (0, 0);
        for entry in self.conns.iter() {
            match entry.key() {
                Audience::Customer(_) => counts.0 += entry.value().len(),
                Audience::Pharmacy(_) => counts.1 += entry.value().len(),
            }
        }
        counts
    }

    /// Closes every connection (shutdown).
    pub fn close_all(&self, close: Close) {
        for entry in self.conns.iter() {
            for outbox in entry.value() {
                outbox.close(close);
            }
        }
    }

    /// The hub's counters.
    pub fn stats(&self) -> &HubStats {
        &self.stats
    }

    fn unsubscribe(&self, who: Audience, id: u64) {
        if let dashmap::Entry::Occupied(mut entry) = self.conns.entry(who) {
            entry.get_mut().retain(|o| o.id != id);
            if entry.get().is_empty() {
                entry.remove();
            }
        }
    }
}

impl Fanout for Hub {
    fn send(&self, to: Audience, msg: Outbound) -> usize {
        let Some(outboxes) = self.conns.get(&to) else {
            return 0;
        };
        let mut queued = 0;
        for outbox in outboxes.iter() {
            queued += usize::from(outbox.push(msg.clone(), &self.stats));
        }
        drop(outboxes);
        self.stats.enqueued.fetch_add(queued as u64, Ordering::Relaxed);
        queued
    }

    fn send_patched(&self, template: &Arc<Template>, to: &[(Audience, f64)]) -> usize {
        let mut queued = 0;
        for &(who, number) in to {
            if let Some(outboxes) = self.conns.get(&who) {
                for outbox in outboxes.iter() {
                    queued += usize::from(outbox.push(Outbound::Patched(template.clone(), number), &self.stats));
                }
            }
        }
        self.stats.enqueued.fetch_add(queued as u64, Ordering::Relaxed);
        queued
    }

    fn close(&self, to: Audience, close: Close) {
        if let Some(outboxes) = self.conns.get(&to) {
            for outbox in outboxes.iter() {
                outbox.close(close);
            }
        }
    }
}

/// One live connection's end of its queue, held by the shell's writer task.
pub struct Subscription {
    hub: Arc<Hub>,
    who: Audience,
    outbox: Arc<Outbox>,
}

impl Subscription {
    /// Whom this connection belongs to.
    pub fn audience(&self) -> Audience {
        self.who
    }

    /// Waits until something is queued or the connection is to close, then moves every queued
    /// message into `batch` (so the writer can send them in one write). Returns the close to send
    /// after those messages, if the connection is closing; the queue is empty then.
    /// Cancel-safe: nothing is taken from the queue until the wait is over.
    pub async fn recv(&self, batch: &mut Vec<Outbound>) -> Option<Close> {
        loop {
            {
                let mut state = self.outbox.state.lock();
                if !state.frames.is_empty() || state.close.is_some() {
                    batch.extend(state.frames.drain(..));
                    return state.close;
                }
            }
            self.outbox.wake.notified().await;
        }
    }

    /// Moves whatever is queued into `batch` without waiting; returns the pending close, if any.
    pub fn try_recv(&self, batch: &mut Vec<Outbound>) -> Option<Close> {
        let mut state = self.outbox.state.lock();
        batch.extend(state.frames.drain(..));
        state.close
    }

    /// Marks this connection closing (idle timeout, protocol error): it takes no more messages.
    pub fn close(&self, close: Close) {
        self.outbox.close(close);
    }

    /// Messages waiting in the queue.
    pub fn queued(&self) -> usize {
        self.outbox.state.lock().frames.len()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.unsubscribe(self.who, self.outbox.id);
    }
}

/// An in-memory stand-in for a cross-node bus: every message goes to every joined node's hub,
/// which delivers it to the connections it holds. Lets the engine's tests run several nodes.
#[derive(Default)]
pub struct MemoryBus {
    nodes: parking_lot::RwLock<Vec<Arc<Hub>>>,
}

impl MemoryBus {
    /// An empty bus.
    pub fn new() -> Arc<MemoryBus> {
        Arc::new(MemoryBus::default())
    }

    /// Joins a node's hub to the bus.
    pub fn join(&self, hub: Arc<Hub>) {
        self.nodes.write().push(hub);
    }
}

impl Fanout for MemoryBus {
    fn send(&self, to: Audience, msg: Outbound) -> usize {
        self.nodes.read().iter().map(|hub| hub.send(to, msg.clone())).sum()
    }

    fn send_patched(&self, template: &Arc<Template>, to: &[(Audience, f64)]) -> usize {
        self.nodes.read().iter().map(|hub| hub.send_patched(template, to)).sum()
    }

    fn close(&self, to: Audience, close: Close) {
        for hub in self.nodes.read().iter() {
            hub.close(to, close);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(msg: &Outbound) -> String {
        String::from_utf8(msg.to_vec()).unwrap()
    }

    #[test]
    fn fast_number_form_matches_ryu() {
        let mut rng_state = 0x9e3779b97f4a7c15u64;
        let check = |x: f64| {
            let mut fast = Vec::new();
            write_json_number(x, &mut fast);
            let want = if x.is_finite() { ryu::Buffer::new().format_finite(x).to_string() } else { "null".into() };
            assert_eq!(String::from_utf8(fast).unwrap(), want, "{x:?}");
        };
        for x in [0.0, -0.0, 0.01, 0.07, 0.1, 0.8, 1.0, 2.5, 4.2, 14.99, 15.0, 49.99, 50.0, 1e12, 1e15, 1e16, f64::NAN]
        {
            check(x);
        }
        for _ in 0..200_000 {
            rng_state ^= rng_state << 13;
            rng_state ^= rng_state >> 7;
            rng_state ^= rng_state << 17;
            let hundredths = (rng_state % 2_000_000) as f64;
            check(hundredths / 100.0);
            check(f64::from_bits(rng_state));
        }
    }

    #[test]
    fn template_patches_the_number() {
        let t = Template::new(Bytes::from_static(b"{\"d\":"), Bytes::from_static(b",\"x\":1}"));
        assert_eq!(t.render(2.5), b"{\"d\":2.5,\"x\":1}");
        assert_eq!(t.render(3.0), b"{\"d\":3.0,\"x\":1}");
        assert_eq!(t.render(0.0), b"{\"d\":0.0,\"x\":1}");
    }

    #[tokio::test]
    async fn several_devices_each_get_every_message() {
        let hub = Hub::new(8);
        let a = hub.subscribe(Audience::Customer(1));
        let b = hub.subscribe(Audience::Customer(1));
        let other = hub.subscribe(Audience::Customer(2));
        assert_eq!(hub.send(Audience::Customer(1), Outbound::Shared(Bytes::from_static(b"m1"))), 2);
        let mut batch = Vec::new();
        assert_eq!(a.recv(&mut batch).await, None);
        assert_eq!(batch.len(), 1);
        batch.clear();
        assert_eq!(b.try_recv(&mut batch), None);
        assert_eq!(batch.len(), 1);
        assert_eq!(other.queued(), 0);
        drop(a);
        assert_eq!(hub.connections(Audience::Customer(1)), 1);
        drop(b);
        assert_eq!(hub.connections(Audience::Customer(1)), 0);
        assert_eq!(hub.socket_counts(), (1, 0));
    }

    #[tokio::test]
    async fn a_full_queue_marks_only_that_connection_slow() {
        let hub = Hub::new(4);
        let stalled = hub.subscribe(Audience::Pharmacy(1));
        let healthy = hub.subscribe(Audience::Pharmacy(2));
        let template = Arc::new(Template::new(Bytes::from_static(b"{\"n\":"), Bytes::from_static(b"}")));
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut batch = Vec::new();
            while got.len() < 100 {
                assert_eq!(healthy.recv(&mut batch).await, None);
                got.extend(batch.drain(..).map(|m| text(&m)));
            }
            got
        });
        for i in 0..100 {
            let to = [(Audience::Pharmacy(1), i as f64), (Audience::Pharmacy(2), i as f64)];
            hub.send_patched(&template, &to);
            tokio::task::yield_now().await;
        }
        let got = reader.await.unwrap();
        let want: Vec<String> =
            (0..100).map(|i| format!("{{\"n\":{}}}", i as f64).replace("{\"n\":0}", "{\"n\":0.0}")).collect();
        assert_eq!(got.len(), 100);
        for (g, i) in got.iter().zip(0..) {
            assert_eq!(g, &String::from_utf8(template.render(i as f64)).unwrap());
        }
        assert_eq!(want.len(), 100);
        // The stalled one kept its first four messages, then was cut; it still reads them.
        let mut batch = Vec::new();
        assert_eq!(stalled.recv(&mut batch).await, Some(Close::SLOW));
        assert_eq!(
            batch.iter().map(text).collect::<Vec<_>>(),
            (0..4).map(|i| String::from_utf8(template.render(i as f64)).unwrap()).collect::<Vec<_>>()
        );
        assert_eq!(hub.stats().slow_cuts.load(Ordering::Relaxed), 1);
        assert_eq!(hub.send(Audience::Pharmacy(1), Outbound::Shared(Bytes::from_static(b"x"))), 0);
    }

    #[tokio::test]
    async fn close_is_delivered_after_the_backlog() {
        let hub = Hub::new(8);
        let sub = hub.subscribe(Audience::Pharmacy(9));
        hub.send(Audience::Pharmacy(9), Outbound::Shared(Bytes::from_static(b"last")));
        hub.close(Audience::Pharmacy(9), Close::SUSPENDED);
        let mut batch = Vec::new();
        assert_eq!(sub.recv(&mut batch).await, Some(Close::SUSPENDED));
        assert_eq!(batch.len(), 1);
    }

    #[tokio::test]
    async fn memory_bus_reaches_every_node() {
        let (node_a, node_b) = (Hub::new(8), Hub::new(8));
        let bus = MemoryBus::new();
        bus.join(node_a.clone());
        bus.join(node_b.clone());
        let on_a = node_a.subscribe(Audience::Customer(5));
        let on_b = node_b.subscribe(Audience::Customer(5));
        assert_eq!(bus.send(Audience::Customer(5), Outbound::Shared(Bytes::from_static(b"hi"))), 2);
        let mut batch = Vec::new();
        on_a.recv(&mut batch).await;
        on_b.recv(&mut batch).await;
        assert_eq!(batch.len(), 2);
    }
}
