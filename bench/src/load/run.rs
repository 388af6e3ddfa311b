//! One run's shared state and the tasks that drive it: a task per pharmacy socket (connect,
//! read, keep the client-side view of open requests, accept by policy, reconnect on a storm) and
//! a task per HTTP call (a customer's POST, a pharmacy's accept).
//!
//! Every request carries `note: "load:<run>:<seq>"`, so a socket knows which planned request a
//! `new_request` belongs to before the customer's 201 has even been read (the server queues the
//! broadcast before it answers), and a pending request left by an earlier run is told apart.
//! POST-to-delivery latency is from the instant just before the POST is written to the read that
//! returned the frame; frames read together share that instant.
//!
//! Each socket keeps what a real client would: the requests it holds (added by `new_request`,
//! removed by `request_taken`/`_cancelled`/`_expired`, replaced by each `sync`), what it was told
//! was taken, and what it received live or replayed, so the checks at the end can tell a lost
//! delivery from a legitimately missed one.

use crate::http::HttpPool;
use crate::plan::{Customer, Expect, PharmacyEntry, Spot};
use crate::stats::Latency;
use crate::ws::{self, Frame, WsStream, opcode};
use bytes::Bytes;
use hyper::Method;
use parking_lot::Mutex;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rustc_hash::{FxHashMap, FxHashSet};
use serde::Deserialize;
use std::borrow::Cow;
use std::collections::hash_map::Entry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Semaphore, watch};

/// What the run exercises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Requests at a fixed rate; one in `1/accept-ratio` accepted by a random recipient.
    Fanout,
    /// Requests at a fixed rate, each raced by K concurrent accepts.
    Race,
    /// N idle authenticated sockets; server RSS per socket.
    Connections,
    /// As fanout, and every socket dropped and reconnected at once mid-run.
    ReconnectStorm,
}

/// One planned request.
#[derive(Debug, Clone, Copy)]
pub struct Planned {
    /// Index into the spots.
    pub spot: u32,
    /// Index into the customers.
    pub customer: u32,
    /// The recipient (index into the pharmacies) that accepts it, if the policy says so.
    pub accepter: Option<u32>,
}

/// Where a planned request is.
pub mod state {
    // 0: not sent yet.
    /// POST written, no answer yet.
    pub const SENT: u8 = 1;
    /// 201.
    pub const CREATED: u8 = 2;
    /// Any other answer, or none.
    pub const FAILED: u8 = 3;
    /// Not sent: the generator had too many calls in flight.
    pub const SKIPPED: u8 = 4;
}

/// What the sockets are told to do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Control {
    /// Bumped to drop and reconnect every socket.
    pub storm: u32,
    /// Close and finish.
    pub stop: bool,
}

/// Latency and errors of one HTTP route.
#[derive(Default)]
pub struct Route {
    /// Latency of every call that got an answer.
    pub latency: Latency,
    /// Calls answered with an unexpected status, or not answered.
    pub errors: AtomicU64,
}

/// Counters every task adds to.
#[derive(Default)]
pub struct Counters {
    /// (socket, request) pairs certainly due, summed as requests are created.
    pub definite_expected: AtomicU64,
    /// Of those, received (first copy, live or replayed).
    pub definite_received: AtomicU64,
    /// `request_taken` due to sockets of certain recipients, summed as winners are known.
    pub taken_expected: AtomicU64,
    /// `request_taken` received by sockets of certain recipients.
    pub taken_received: AtomicU64,
    /// Live `new_request` frames received (first copies).
    pub live_deliveries: AtomicU64,
    /// Every text frame received.
    pub frames: AtomicU64,
    /// HTTP calls in flight.
    pub inflight: AtomicI64,
    /// Requests not sent because too many calls were in flight.
    pub skipped: AtomicU64,
    /// 201s whose `pharmacies_notified` disagrees with the generator's count (whole city listed).
    pub notified_mismatch: AtomicU64,
    /// Accepts answered 400 "already assigned" (race losers).
    pub race_losers: AtomicU64,
    /// Accepts sent.
    pub accepts: AtomicU64,
    /// Sockets that finished their handshake, `connection` and `sync` (reconnects count again).
    pub ready: AtomicU64,
    /// Failed connection attempts.
    pub connect_failures: AtomicU64,
    /// Connections closed by the server (or the network) while the run wanted them open.
    pub unexpected_closes: AtomicU64,
    /// ns since `t0` (+1) of the first POST.
    pub first_send_ns: AtomicU64,
    /// ns since `t0` of the last live delivery.
    pub last_delivery_ns: AtomicU64,
}

/// A run's shared state.
pub struct Run {
    /// Mode.
    pub mode: Mode,
    /// `load:<run id>:`, the prefix of every note this run sends.
    pub tag: String,
    /// The run's clock.
    pub t0: Instant,
    /// Server address.
    pub addr: SocketAddr,
    /// Host header.
    pub host: String,
    /// Listed pharmacies.
    pub pharmacies: Vec<PharmacyEntry>,
    /// Pharmacies with sockets (the first `held` of the list).
    pub held: usize,
    /// Sockets; socket `s` belongs to pharmacy `s % held`.
    pub sockets: usize,
    /// Customers.
    pub customers: Vec<Customer>,
    /// Request locations.
    pub spots: Vec<Spot>,
    /// The requests, by sequence number.
    pub plan: Vec<Planned>,
    /// Concurrent accepts per request in race mode.
    pub race_k: usize,
    /// Seed (race contenders are drawn from it per request).
    pub seed: u64,
    /// Whether sockets ask for replay and `sync`.
    pub replay: bool,
    /// Per request: ns since `t0` (+1) when its POST was written; 0 before.
    pub sent_ns: Vec<AtomicU64>,
    /// Per request: the server's id, 0 until known.
    pub request_id: Vec<AtomicI64>,
    /// Per request: see [`state`].
    pub state: Vec<AtomicU8>,
    /// Per request: 201 ACCEPTED answers.
    pub winners: Vec<AtomicU32>,
    /// Per request: the first winner (pharmacy index + 1), 0 if none.
    pub winner: Vec<AtomicU32>,
    /// Per request: race contenders fired.
    pub contenders: Vec<AtomicU32>,
    /// Per request: its policy accept has been fired (once, by the first socket of the accepter).
    pub accept_fired: Vec<AtomicBool>,
    /// The server's request ids mapped back to sequence numbers.
    pub by_request_id: Mutex<FxHashMap<i64, u32>>,
    /// The HTTP connection pool.
    pub http: HttpPool,
    /// `POST /medicine/request/`.
    pub create_route: Route,
    /// `POST /medicine/response/`.
    pub accept_route: Route,
    /// POST sent → live `new_request` read.
    pub delivery: Latency,
    /// POST sent → first copy read, when that copy was a replay after a reconnect.
    pub replay_delivery: Latency,
    /// TCP connect + upgrade → 101.
    pub ws_connect: Latency,
    /// Counters.
    pub c: Counters,
    /// The first few error descriptions.
    pub errors: Mutex<Vec<String>>,
    /// Bounds concurrent handshakes (a listen backlog overflow costs a 1 s SYN retry).
    pub connect_gate: Semaphore,
}

impl Run {
    /// ns since `t0`.
    pub fn now_ns(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }

    /// The pharmacy (index into the list) socket `slot` belongs to.
    pub fn pharmacy_of(&self, slot: usize) -> u32 {
        (slot % self.held.max(1)) as u32
    }

    /// The sockets of pharmacy `p`.
    pub fn sockets_of(&self, p: u32) -> impl Iterator<Item = usize> + use<> {
        (p as usize..self.sockets).step_by(self.held.max(1))
    }

    /// The spot of request `seq`.
    pub fn spot_of(&self, seq: u32) -> &Spot {
        &self.spots[self.plan[seq as usize].spot as usize]
    }

    /// Sockets of certain recipients of `spot`, except those of pharmacy `but`.
    fn definite_sockets(&self, spot: &Spot, but: Option<u32>) -> u64 {
        spot.definite.iter().filter(|p| Some(**p) != but).map(|p| self.sockets_of(*p).count() as u64).sum()
    }

    /// Remembers an error description (the first 20).
    pub fn note_error(&self, what: String) {
        let mut errors = self.errors.lock();
        if errors.len() < 20 {
            errors.push(what);
        }
    }

    fn learn_request_id(&self, seq: u32, id: i64) {
        if self.request_id[seq as usize].swap(id, Relaxed) == 0 {
            self.by_request_id.lock().insert(id, seq);
        }
    }

    fn seq_of(&self, id: i64) -> Option<u32> {
        self.by_request_id.lock().get(&id).copied()
    }
}

/// The body of a `new_request`'s note for request `seq`.
fn seq_from_note(tag: &str, note: Option<&str>, planned: usize) -> Option<u32> {
    let seq: u32 = note?.strip_prefix(tag)?.parse().ok()?;
    ((seq as usize) < planned).then_some(seq)
}

/// Sends request `seq` as its customer and records the answer.
pub async fn post_request(run: Arc<Run>, seq: u32) {
    let planned = run.plan[seq as usize];
    let spot = &run.spots[planned.spot as usize];
    let customer = &run.customers[planned.customer as usize];
    let body = format!(
        "{{\"patient_lat\":{},\"patient_lng\":{},\"radius_km\":{},\"quantity\":1,\
         \"medicine_name\":\"Paracetamol 500mg\",\"note\":\"{}{}\"}}",
        spot.lat, spot.lng, spot.radius_km, run.tag, seq
    );
    run.state[seq as usize].store(state::SENT, Relaxed);
    let sent = run.now_ns() + 1;
    run.sent_ns[seq as usize].store(sent, Relaxed);
    let _ = run.c.first_send_ns.compare_exchange(0, sent, Relaxed, Relaxed);
    let started = Instant::now();
    let answer =
        run.http.call(Method::POST, "/medicine/request/", Some(&customer.access), Some(Bytes::from(body))).await;
    let elapsed = started.elapsed().as_micros() as u64;
    let created = match answer {
        Ok(a) if a.status == 201 => {
            run.create_route.latency.record(elapsed);
            #[derive(Deserialize)]
            struct Created {
                request_id: i64,
                pharmacies_notified: u64,
            }
            match serde_json::from_slice::<Created>(&a.body) {
                Ok(c) => Some(c),
                Err(e) => {
                    run.note_error(format!("POST /medicine/request/: 201 without request_id: {e}"));
                    None
                }
            }
        }
        Ok(a) => {
            run.create_route.latency.record(elapsed);
            run.note_error(format!("POST /medicine/request/: {} {}", a.status, String::from_utf8_lossy(&a.body)));
            None
        }
        Err(e) => {
            run.note_error(format!("POST /medicine/request/: {e}"));
            None
        }
    };
    let Some(created) = created else {
        run.create_route.errors.fetch_add(1, Relaxed);
        run.state[seq as usize].store(state::FAILED, Relaxed);
        return;
    };
    run.learn_request_id(seq, created.request_id);
    run.c.definite_expected.fetch_add(run.definite_sockets(spot, None), Relaxed);
    if let Some((inside, near)) = spot.listed {
        let n = created.pharmacies_notified as usize;
        if n < inside || n > inside + near {
            run.c.notified_mismatch.fetch_add(1, Relaxed);
        }
    }
    run.state[seq as usize].store(state::CREATED, Relaxed);
    if run.mode == Mode::Race && !spot.definite.is_empty() {
        let mut rng = StdRng::seed_from_u64(run.seed ^ (u64::from(seq) << 20) ^ 0x5EED);
        let k = run.race_k.min(spot.definite.len());
        run.contenders[seq as usize].store(k as u32, Relaxed);
        for i in sample(&mut rng, spot.definite.len(), k) {
            let pharmacy = spot.definite[i];
            run.c.inflight.fetch_add(1, Relaxed);
            tokio::spawn(accept(run.clone(), seq, pharmacy, created.request_id));
        }
    }
}

/// Pharmacy `pharmacy` accepts request `seq` (`id` on the server). The caller has counted it in
/// `inflight`.
pub async fn accept(run: Arc<Run>, seq: u32, pharmacy: u32, id: i64) {
    run.c.accepts.fetch_add(1, Relaxed);
    let body = format!("{{\"request_id\":{id},\"response_type\":\"ACCEPTED\"}}");
    let token = &run.pharmacies[pharmacy as usize].access;
    let started = Instant::now();
    let answer = run.http.call(Method::POST, "/medicine/response/", Some(token), Some(Bytes::from(body))).await;
    let elapsed = started.elapsed().as_micros() as u64;
    match answer {
        Ok(a) if a.status == 201 => {
            run.accept_route.latency.record(elapsed);
            let winners = run.winners[seq as usize].fetch_add(1, Relaxed) + 1;
            if winners == 1 {
                run.winner[seq as usize].store(pharmacy + 1, Relaxed);
                let spot = run.spot_of(seq);
                run.c.taken_expected.fetch_add(run.definite_sockets(spot, Some(pharmacy)), Relaxed);
            }
        }
        Ok(a) if a.status == 400 && run.mode == Mode::Race => {
            run.accept_route.latency.record(elapsed);
            run.c.race_losers.fetch_add(1, Relaxed);
        }
        Ok(a) => {
            run.accept_route.latency.record(elapsed);
            run.accept_route.errors.fetch_add(1, Relaxed);
            run.note_error(format!("POST /medicine/response/: {} {}", a.status, String::from_utf8_lossy(&a.body)));
        }
        Err(e) => {
            run.accept_route.errors.fetch_add(1, Relaxed);
            run.note_error(format!("POST /medicine/response/: {e}"));
        }
    }
    run.c.inflight.fetch_sub(1, Relaxed);
}

/// A received request, as one socket saw it.
#[derive(Debug, Clone, Copy)]
pub struct Received {
    /// Its sequence number.
    pub seq: u32,
    /// Live copies received.
    pub live: u32,
}

/// What one socket saw, handed back when it finishes.
#[derive(Debug, Default)]
pub struct SocketState {
    /// Pharmacy index.
    pub pharmacy: u32,
    /// This run's requests received (live or replayed), by server id.
    pub received: FxHashMap<i64, Received>,
    /// Request ids held open at the end, as a client would show them.
    pub held: FxHashSet<i64>,
    /// Request ids it was told were taken.
    pub taken: FxHashSet<i64>,
    /// Replayed ids of the current connection (checked against its `sync`).
    replayed: FxHashSet<i64>,
    /// Successful connections.
    pub connects: u32,
    /// Live copies beyond the first, and replay copies repeated within one connection.
    pub duplicates: u64,
    /// Messages about a request after its `request_taken`.
    pub after_taken: u64,
    /// Requests received though certainly outside their radius.
    pub unexpected: u64,
    /// Ids a `sync` named without a replay, or replayed without being named.
    pub sync_mismatch: u64,
    /// `new_request`s of other runs (or other tools).
    pub foreign: u64,
    /// Text frames that were not the JSON expected.
    pub bad_frames: u64,
    /// Whether the socket gave up (could not connect, or closed too often).
    pub gave_up: bool,
}

impl SocketState {
    /// The state of a socket whose task did not finish in time.
    pub fn lost() -> SocketState {
        SocketState { gave_up: true, ..SocketState::default() }
    }
}

/// The fields of a server message the generator reads.
#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default)]
    request_id: Option<i64>,
    #[serde(default, borrow)]
    note: Option<Cow<'a, str>>,
    #[serde(default)]
    replay: Option<bool>,
    #[serde(default)]
    pending: Option<Vec<i64>>,
}

/// How a connection ended.
enum Ended {
    Stop,
    Storm,
    Lost(String),
}

/// Runs socket `slot` until told to stop: connects, reads, reconnects after a storm (or, at most
/// three times, after losing the connection), and returns what it saw.
pub async fn socket_task(run: Arc<Run>, slot: usize, mut control: watch::Receiver<Control>) -> SocketState {
    let pharmacy = run.pharmacy_of(slot);
    let mut st = SocketState { pharmacy, ..SocketState::default() };
    let path = format!(
        "/ws/pharmacy/?token={}{}",
        run.pharmacies[pharmacy as usize].access,
        if run.replay { "" } else { "&replay=0" }
    );
    let mut storm_seen = control.borrow().storm;
    let mut failures = 0;
    while !control.borrow().stop {
        let permit = run.connect_gate.acquire().await.ok();
        let started = Instant::now();
        let connected = WsStream::connect(run.addr, &run.host, &path, Duration::from_secs(20)).await;
        let ws = match connected {
            Ok(ws) => ws,
            Err(e) => {
                drop(permit);
                run.c.connect_failures.fetch_add(1, Relaxed);
                run.note_error(format!(
                    "socket {slot} (pharmacy {}): connect: {e}",
                    run.pharmacies[pharmacy as usize].pharmacy_id
                ));
                failures += 1;
                if failures > 3 {
                    st.gave_up = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        run.ws_connect.record(started.elapsed().as_micros() as u64);
        st.connects += 1;
        match session(&run, &mut st, ws, &mut control, &mut storm_seen, permit).await {
            Ended::Stop => break,
            Ended::Storm => continue,
            Ended::Lost(why) => {
                if control.borrow().stop {
                    break;
                }
                run.c.unexpected_closes.fetch_add(1, Relaxed);
                run.note_error(format!(
                    "socket {slot} (pharmacy {}): {why}",
                    run.pharmacies[pharmacy as usize].pharmacy_id
                ));
                failures += 1;
                if failures > 3 {
                    st.gave_up = true;
                    break;
                }
            }
        }
    }
    st
}

/// Reads one connection until it ends.
async fn session(
    run: &Arc<Run>,
    st: &mut SocketState,
    mut ws: WsStream,
    control: &mut watch::Receiver<Control>,
    storm_seen: &mut u32,
    mut permit: Option<tokio::sync::SemaphorePermit<'_>>,
) -> Ended {
    st.replayed.clear();
    let mut fragments: Option<Vec<u8>> = None;
    // Flushed after every read, and on every way out (its Drop), so nothing read is left uncounted.
    let mut batch = Batch { run, now_ns: 0, live: Vec::new(), replayed: Vec::new(), frames: 0, definite: 0 };
    let mut now_ns = run.now_ns();
    loop {
        loop {
            let frame = match ws::parse_frame(&mut ws.buf) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => return Ended::Lost(format!("protocol: {e}")),
            };
            let Frame { fin, opcode, payload } = frame;
            match opcode {
                opcode::TEXT | opcode::BINARY | opcode::CONTINUATION => {
                    let message = match (&mut fragments, opcode, fin) {
                        (None, opcode::CONTINUATION, _) => return Ended::Lost("stray continuation".into()),
                        (None, _, true) => payload,
                        (None, _, false) => {
                            fragments = Some(payload.to_vec());
                            continue;
                        }
                        (Some(parts), opcode::CONTINUATION, fin) => {
                            parts.extend_from_slice(&payload);
                            if parts.len() > ws::MAX_MESSAGE {
                                return Ended::Lost("message too long".into());
                            }
                            if !fin {
                                continue;
                            }
                            Bytes::from(fragments.take().unwrap_or_default())
                        }
                        (Some(_), _, _) => return Ended::Lost("new message inside a fragmented one".into()),
                    };
                    if opcode == opcode::BINARY {
                        st.bad_frames += 1;
                        continue;
                    }
                    if on_text(run, st, &message, now_ns, &mut batch) {
                        // Ready: `sync` (or `connection` without replay) arrived.
                        drop(permit.take());
                    }
                }
                opcode::PING => {
                    if let Err(e) = ws.stream.write_all(&ws::client_frame(opcode::PONG, &payload)).await {
                        return Ended::Lost(format!("pong: {e}"));
                    }
                }
                opcode::CLOSE => {
                    let code = Frame { fin, opcode, payload }.close_code();
                    let _ = ws.stream.write_all(&ws::close_frame(code)).await;
                    return Ended::Lost(format!("closed by the server with {code}"));
                }
                _ => {}
            }
        }
        batch.now_ns = now_ns;
        batch.flush();
        if ws.buf.capacity() - ws.buf.len() < 1024 {
            ws.buf.reserve(8192);
        }
        tokio::select! {
            read = ws.stream.read_buf(&mut ws.buf) => match read {
                Ok(0) => return Ended::Lost("connection closed without a close frame".into()),
                Ok(_) => now_ns = run.now_ns(),
                Err(e) => return Ended::Lost(format!("read: {e}")),
            },
            changed = control.changed() => {
                let now = *control.borrow();
                if changed.is_err() || now.stop {
                    let _ = ws.stream.write_all(&ws::close_frame(1000)).await;
                    return Ended::Stop;
                }
                if now.storm != *storm_seen {
                    *storm_seen = now.storm;
                    // Dropped, not closed: as a phone losing its network would.
                    return Ended::Storm;
                }
            }
        }
    }
}

/// What one read brought, added to the shared counters once per read rather than once per frame
/// (two cores bouncing one cache line 150,000 times a second is a cost of its own).
struct Batch<'a> {
    run: &'a Run,
    /// When the read that brought these frames returned.
    now_ns: u64,
    /// Latencies of live first copies, µs.
    live: Vec<u64>,
    /// Latencies of replayed first copies, µs.
    replayed: Vec<u64>,
    /// Text frames.
    frames: u64,
    /// First copies to certain recipients.
    definite: u64,
}

impl Batch<'_> {
    fn flush(&mut self) {
        let (run, now_ns) = (self.run, self.now_ns);
        if !self.live.is_empty() {
            run.c.live_deliveries.fetch_add(self.live.len() as u64, Relaxed);
            run.c.last_delivery_ns.fetch_max(now_ns, Relaxed);
            run.delivery.record_all(&self.live);
            self.live.clear();
        }
        if !self.replayed.is_empty() {
            run.replay_delivery.record_all(&self.replayed);
            self.replayed.clear();
        }
        if self.frames > 0 {
            run.c.frames.fetch_add(std::mem::take(&mut self.frames), Relaxed);
        }
        if self.definite > 0 {
            run.c.definite_received.fetch_add(std::mem::take(&mut self.definite), Relaxed);
        }
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Handles one text message; returns whether the socket just became ready.
fn on_text(run: &Arc<Run>, st: &mut SocketState, text: &[u8], now_ns: u64, batch: &mut Batch<'_>) -> bool {
    batch.frames += 1;
    let Ok(msg) = serde_json::from_slice::<Incoming>(text) else {
        st.bad_frames += 1;
        return false;
    };
    match &*msg.kind {
        "connection" if !run.replay => {
            run.c.ready.fetch_add(1, Relaxed);
            return true;
        }
        "new_request" => {
            let Some(id) = msg.request_id else {
                st.bad_frames += 1;
                return false;
            };
            let replay = msg.replay.unwrap_or(false);
            if replay && !st.replayed.insert(id) {
                st.duplicates += 1;
            }
            if st.taken.contains(&id) {
                st.after_taken += 1;
            }
            st.held.insert(id);
            let Some(seq) = seq_from_note(&run.tag, msg.note.as_deref(), run.plan.len()) else {
                st.foreign += 1;
                return false;
            };
            match st.received.entry(id) {
                Entry::Vacant(v) => {
                    v.insert(Received { seq, live: u32::from(!replay) });
                    run.learn_request_id(seq, id);
                    match run.spot_of(seq).expect(st.pharmacy) {
                        Expect::Definite => {
                            batch.definite += 1;
                        }
                        Expect::Either => {}
                        Expect::Outside => st.unexpected += 1,
                    }
                    let sent = run.sent_ns[seq as usize].load(Relaxed);
                    if sent > 0 {
                        let micros = now_ns.saturating_sub(sent - 1) / 1000;
                        if replay { batch.replayed.push(micros) } else { batch.live.push(micros) }
                    }
                }
                Entry::Occupied(mut o) => {
                    if !replay {
                        if o.get().live > 0 {
                            st.duplicates += 1;
                        }
                        o.get_mut().live += 1;
                    }
                }
            }
            let planned = run.plan[seq as usize];
            if matches!(run.mode, Mode::Fanout | Mode::ReconnectStorm)
                && planned.accepter == Some(st.pharmacy)
                && !run.accept_fired[seq as usize].swap(true, Relaxed)
            {
                run.c.inflight.fetch_add(1, Relaxed);
                tokio::spawn(accept(run.clone(), seq, st.pharmacy, id));
            }
        }
        "request_taken" => {
            let Some(id) = msg.request_id else {
                st.bad_frames += 1;
                return false;
            };
            if !st.taken.insert(id) {
                st.after_taken += 1;
            }
            st.held.remove(&id);
            let seq = st.received.get(&id).map(|r| r.seq).or_else(|| run.seq_of(id));
            if let Some(seq) = seq
                && run.spot_of(seq).expect(st.pharmacy) == Expect::Definite
            {
                run.c.taken_received.fetch_add(1, Relaxed);
            }
        }
        "request_cancelled" | "request_expired" => {
            if let Some(id) = msg.request_id {
                st.held.remove(&id);
            }
        }
        "sync" => {
            let pending: FxHashSet<i64> = msg.pending.unwrap_or_default().into_iter().collect();
            st.sync_mismatch += pending.symmetric_difference(&st.replayed).count() as u64;
            // What a client shows after a reconnect: exactly what the server says is open.
            st.held = pending;
            run.c.ready.fetch_add(1, Relaxed);
            return true;
        }
        _ => {}
    }
    false
}
