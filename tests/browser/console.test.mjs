// The web console in a real browser against the real server binary.
//
// Starts `sanjevani serve --demo` on a free loopback port with a temporary data dir, drives
// Debian's Chromium through playwright-core (no browser download), and plays the seed's story in
// separate browser contexts: pharmacies A and B are online, the demo customer posts a request
// within 3 km, both see it, A accepts, the customer sees the acceptance, B sees it taken. Then B
// signs out, the customer posts a second request, B comes back and gets it replayed, the
// customer cancels it and both pharmacies see the cancellation. Then B's socket is cut while a
// third request is open and A accepts it: B reconnects with backoff and its `sync` drops the
// request. Finally an admin approves the pending demo pharmacy E, which can then go live. Any
// console error or page error fails the test.
//
// Environment: SANJEVANI_BIN (default $CARGO_TARGET_DIR/release/sanjevani, else target/...),
// CHROMIUM (default /usr/bin/chromium), BROWSER_ARTIFACTS (default target/browser-artifacts).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createWriteStream } from 'node:fs';
import fs from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, '..', '..');
const targetDir = path.resolve(root, process.env.CARGO_TARGET_DIR || 'target');
const BIN = process.env.SANJEVANI_BIN || path.join(targetDir, 'release', 'sanjevani');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const ARTIFACTS = path.resolve(root, process.env.BROWSER_ARTIFACTS || path.join('target', 'browser-artifacts'));
const demo = JSON.parse(await fs.readFile(path.join(root, 'data', 'demo.json'), 'utf8'));
const byKey = Object.fromEntries(demo.pharmacies.map((p) => [p.key, p]));
const CENTER = demo.center;

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function haversineKm(a, b) {
  const rad = (d) => (d * Math.PI) / 180;
  const dLat = rad(b.lat - a.lat);
  const dLng = rad(b.lng - a.lng);
  const x = Math.sin(dLat / 2) ** 2 + Math.cos(rad(a.lat)) * Math.cos(rad(b.lat)) * Math.sin(dLng / 2) ** 2;
  return 2 * 6371 * Math.asin(Math.sqrt(x));
}

/** "800 m" or "2.20 km" as km. */
function parseDistance(text) {
  const m = /^([\d.]+) (m|km)$/.exec(text.trim());
  assert.ok(m, `distance text ${JSON.stringify(text)}`);
  return Number(m[1]) / (m[2] === 'm' ? 1000 : 1);
}

async function freePort() {
  const server = net.createServer();
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return port;
}

async function startServer() {
  await fs.access(BIN).catch(() => {
    throw new Error(`${BIN} is missing: build it with cargo build --release -p sanjevani`);
  });
  const port = await freePort();
  const dataDir = await fs.mkdtemp(path.join(os.tmpdir(), 'sanjevani-browser-'));
  const log = createWriteStream(path.join(ARTIFACTS, 'server.log'));
  const args = ['serve', '--demo', '--bind', `127.0.0.1:${port}`, '--data-dir', dataDir, '--access-ttl', '1h', '--rate-limits', 'off'];
  // cwd is the data dir so that no stray .env changes the settings.
  const child = spawn(BIN, args, { cwd: dataDir, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, NO_COLOR: '1' } });
  child.stdout.pipe(log);
  child.stderr.pipe(log);
  let exited = null;
  const exit = new Promise((resolve) => child.on('exit', (code, signal) => { exited = { code, signal }; resolve(exited); }));
  const base = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + 60_000;
  for (;;) {
    if (exited) throw new Error(`the server exited early (${JSON.stringify(exited)}); see ${ARTIFACTS}/server.log`);
    try {
      const res = await fetch(`${base}/health`);
      await res.arrayBuffer();
      if (res.status === 200) break;
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) throw new Error('the server did not become healthy within 60 s');
    await sleep(100);
  }
  return {
    base,
    async stop() {
      if (!exited) child.kill('SIGTERM');
      let timer;
      const result = await Promise.race([exit, new Promise((resolve) => { timer = setTimeout(resolve, 15_000, null); })]);
      clearTimeout(timer);
      if (!result) child.kill('SIGKILL');
      log.end();
      await fs.rm(dataDir, { recursive: true, force: true });
      return result;
    },
  };
}

/** Retries `check` until it returns a truthy value (or stops throwing). */
async function eventually(what, check, timeout = 10_000) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      const v = await check();
      if (v) return v;
      last = new Error(`got ${JSON.stringify(v)}`);
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}: ${last && last.message}`);
    await sleep(100);
  }
}

test('the console: post, broadcast, accept, taken, replay, cancel, reconnect and sync, approve', { timeout: 180_000 }, async (t) => {
  await fs.mkdir(ARTIFACTS, { recursive: true });
  for (const f of await fs.readdir(ARTIFACTS)) if (f.endsWith('.png')) await fs.rm(path.join(ARTIFACTS, f));

  const server = await startServer();
  t.after(async () => {
    const result = await server.stop();
    assert.deepEqual(result, { code: 0, signal: null }, 'the server stops cleanly on SIGTERM');
  });

  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--no-first-run', '--disable-quic', '--disable-sync',
    ],
  });
  t.after(() => browser.close());

  const problems = [];
  const pages = {};
  async function open(who) {
    const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    const page = await context.newPage();
    page.setDefaultTimeout(10_000);
    page.on('console', (m) => { if (m.type() === 'error') problems.push(`${who}: console error: ${m.text()}`); });
    page.on('pageerror', (e) => problems.push(`${who}: page error: ${e.message}`));
    pages[who] = page;
    return page;
  }
  async function signIn(page, email, password) {
    await page.goto(`${server.base}/`);
    await page.getByTestId('login-email').fill(email);
    await page.getByTestId('login-password').fill(password);
    await page.getByTestId('login-submit').click();
  }
  async function live(page) {
    await page.locator('[data-testid=ws-status][data-state=open]').waitFor();
  }
  async function screenshot(who, file) {
    await pages[who].screenshot({ path: path.join(ARTIFACTS, file), fullPage: true });
  }

  // The console page itself: served with the right headers.
  const index = await fetch(`${server.base}/`);
  assert.equal(index.status, 200);
  assert.equal(index.headers.get('content-type'), 'text/html; charset=utf-8');
  assert.equal(index.headers.get('cache-control'), 'no-cache');
  assert.ok(index.headers.get('etag'));
  assert.match(await index.text(), /<title>Sanjevani console<\/title>/);

  // A prescription image, drawn by the browser itself.
  const scratch = await browser.newPage();
  await scratch.setContent('<div id="rx" style="width:240px;height:160px;padding:16px;font:20px serif;background:#fffdf4;' +
    'border:2px solid #345">℞ Amoxicillin 500 mg<br>1 capsule three times a day<br><i>Dr. Demo</i></div>');
  const prescription = await scratch.locator('#rx').screenshot({ type: 'png' });
  await scratch.close();

  // Pharmacies A and B go live.
  const pa = await open('pharmacyA');
  const pb = await open('pharmacyB');
  // B's pharmacy socket passes through the test, which can cut it (a network blip) and refuse
  // reconnections for a while.
  const bLinks = [];
  let bOffline = false;
  let bRefused = 0;
  await pb.routeWebSocket(/\/ws\/pharmacy\//, (ws) => {
    if (bOffline) {
      bRefused += 1;
      ws.close({ code: 1013, reason: 'test: network down' });
      return;
    }
    bLinks.push({ ws, server: ws.connectToServer() });
  });
  await signIn(pa, byKey.A.email, byKey.A.password);
  await signIn(pb, byKey.B.email, byKey.B.password);
  await live(pa);
  await live(pb);
  await pa.getByTestId('pharmacy-where').filter({ hasText: byKey.A.pharmacy_name }).waitFor();

  // The customer composes a request: the map click moves the point, typed coordinates put it back.
  const customer = demo.customers[0];
  const pc = await open('customer');
  await signIn(pc, customer.email, customer.password);
  await live(pc);
  await pc.getByTestId('customer-map').click({ position: { x: 100, y: 80 } });
  const moved = Number(await pc.getByTestId('req-lat').inputValue());
  assert.ok(moved > CENTER.lat, `a click north-west of the centre moves the point north (lat ${moved})`);
  await pc.getByTestId('req-lat').fill(String(CENTER.lat));
  await pc.getByTestId('req-lng').fill(String(CENTER.lng));
  await pc.getByTestId('req-medicine').fill('Amoxicillin 500 mg');
  await pc.getByTestId('req-quantity').fill('10');
  await pc.getByTestId('req-note').fill('Please call before delivery');
  await pc.getByTestId('req-image').setInputFiles({ name: 'prescription.png', mimeType: 'image/png', buffer: prescription });
  const radius = pc.getByTestId('req-radius');
  await radius.focus();
  await radius.press('Home');
  await radius.press('ArrowRight');
  await radius.press('ArrowRight');
  assert.equal(await radius.inputValue(), '3');
  await pc.getByTestId('req-radius-value').filter({ hasText: '3 km' }).waitFor();

  const [created] = await Promise.all([
    pc.waitForResponse((r) => r.url().endsWith('/medicine/request/') && r.request().method() === 'POST'),
    pc.getByTestId('req-submit').click(),
  ]);
  assert.equal(created.status(), 201);
  const first = await created.json();
  const id = first.request_id;
  assert.equal(first.pharmacies_notified, 2, 'A (0.8 km) and B (2.2 km); C is 4.2 km away, E is not approved');
  await pc.getByTestId('pharmacies-notified').filter({ hasText: /^2$/ }).waitFor();
  await pc.getByTestId('request-status').filter({ hasText: 'PENDING' }).waitFor();
  // The map: the radius circle, the patient, and the two notified pharmacies from the detail.
  await pc.locator('[data-testid=map-radius]').waitFor();
  await pc.locator('[data-testid=map-patient]').waitFor();
  await eventually('two notified pharmacies on the map', async () => (await pc.locator('[data-testid^=map-pharmacy-]').count()) === 2);
  await pc.locator('[data-testid=map-scale]').waitFor();
  await screenshot('customer', '01-customer-posted.png');

  // Both pharmacies see it live, with their distance and the prescription image.
  for (const [page, key] of [[pa, 'A'], [pb, 'B']]) {
    const card = page.getByTestId(`incoming-${id}`);
    await card.waitFor();
    assert.match(await card.textContent(), /Amoxicillin 500 mg × 10/);
    const shown = parseDistance(await page.getByTestId(`distance-${id}`).textContent());
    const expected = haversineKm(CENTER, byKey[key]);
    assert.ok(Math.abs(shown - expected) < 0.011, `pharmacy ${key}: shown ${shown} km, expected ${expected.toFixed(3)} km`);
    const img = page.getByTestId(`incoming-image-${id}`);
    await eventually(`pharmacy ${key}'s prescription image`, () => img.evaluate((el) => el.complete && el.naturalWidth > 0));
    await page.getByTestId(`map-request-${id}`).waitFor();
  }
  await screenshot('pharmacyA', '02-pharmacy-a-incoming.png');

  // A accepts with a message.
  await pa.getByTestId(`message-${id}`).fill('In stock, ready in 10 minutes');
  await pa.getByTestId(`accept-${id}`).click();
  await pa.locator(`[data-testid=closed-${id}][data-state=accepted]`).waitFor();
  assert.equal(await pa.getByTestId(`incoming-${id}`).count(), 0);

  // The customer sees the acceptance, A highlighted as the winner.
  const winner = pc.locator('[data-testid^=response-][data-winner=true][data-response-type=ACCEPTED]');
  await winner.waitFor();
  assert.match(await winner.textContent(), new RegExp(byKey.A.pharmacy_name));
  assert.match(await winner.textContent(), /In stock, ready in 10 minutes/);
  await pc.getByTestId('request-status').filter({ hasText: 'ACCEPTED' }).waitFor();
  await pc.locator('#customer-map .pt.winner').waitFor();
  assert.equal(await pc.getByTestId('cancel-request').count(), 0, 'no cancel button once accepted');

  // B sees it taken, and it is no longer offered.
  await pb.locator(`[data-testid=closed-${id}][data-state=taken]`).waitFor();
  assert.equal(await pb.getByTestId(`incoming-${id}`).count(), 0);

  await screenshot('customer', '03-customer-accepted.png');
  await screenshot('pharmacyA', '04-pharmacy-a-accepted.png');
  await screenshot('pharmacyB', '05-pharmacy-b-taken.png');

  // B goes offline; a second request reaches A live and B by replay when it comes back.
  await pb.getByTestId('sign-out').click();
  await pb.getByTestId('login-view').waitFor();
  await pc.getByTestId('req-medicine').fill('Paracetamol 500 mg');
  await pc.getByTestId('req-quantity').fill('20');
  await pc.getByTestId('req-note').fill('');
  await pc.getByTestId('req-image').setInputFiles([]);
  const [created2] = await Promise.all([
    pc.waitForResponse((r) => r.url().endsWith('/medicine/request/') && r.request().method() === 'POST'),
    pc.getByTestId('req-submit').click(),
  ]);
  const id2 = (await created2.json()).request_id;
  await pa.getByTestId(`incoming-${id2}`).waitFor();
  await signIn(pb, byKey.B.email, byKey.B.password);
  await live(pb);
  const replayed = pb.getByTestId(`incoming-${id2}`);
  await replayed.waitFor();
  assert.match(await replayed.textContent(), /replayed/);
  assert.equal(await pb.getByTestId(`incoming-${id}`).count(), 0, 'the accepted request is not replayed');
  await pb.getByTestId('pharmacy-log').filter({ hasText: 'sync: 1 open' }).waitFor();
  await screenshot('pharmacyB', '06-pharmacy-b-replayed.png');

  // The customer cancels it; both pharmacies see the cancellation as it happens.
  await pc.getByTestId('request-status').filter({ hasText: 'PENDING' }).waitFor();
  await pc.getByTestId('cancel-request').click();
  await pc.getByTestId('request-status').filter({ hasText: 'CANCELLED' }).waitFor();
  for (const page of [pa, pb]) {
    await page.locator(`[data-testid=closed-${id2}][data-state=cancelled]`).waitFor();
    assert.equal(await page.getByTestId(`incoming-${id2}`).count(), 0);
  }
  await screenshot('pharmacyB', '07-pharmacy-b-cancelled.png');

  // B's socket drops while it has a request open, and its retries are refused; meanwhile A
  // accepts that request, which B cannot hear of. B reconnects by itself with backoff, and the
  // `sync` after the replay removes the request from its open list.
  const [created3] = await Promise.all([
    pc.waitForResponse((r) => r.url().endsWith('/medicine/request/') && r.request().method() === 'POST'),
    pc.getByTestId('req-submit').click(),
  ]);
  const id3 = (await created3.json()).request_id;
  await pa.getByTestId(`incoming-${id3}`).waitFor();
  await pb.getByTestId(`incoming-${id3}`).waitFor();
  bOffline = true;
  for (const link of bLinks.splice(0)) {
    await link.server.close({ code: 1000, reason: 'test: blip' });
    await link.ws.close({ code: 1012, reason: 'test: blip' });
  }
  await pb.locator('[data-testid=ws-status][data-state=reconnecting]').waitFor();
  await pa.getByTestId(`accept-${id3}`).click();
  await pa.locator(`[data-testid=closed-${id3}][data-state=accepted]`).waitFor();
  await eventually('two refused reconnections (backoff)', () => bRefused >= 2, 15_000);
  assert.equal(await pb.getByTestId(`incoming-${id3}`).count(), 1, 'B has not heard of it yet');
  bOffline = false;
  await live(pb);
  await pb.locator(`[data-testid=closed-${id3}][data-state=gone]`).waitFor();
  assert.equal(await pb.getByTestId(`incoming-${id3}`).count(), 0);
  await pb.getByTestId('pharmacy-log').filter({ hasText: 'sync: 0 open, 1 closed while away' }).waitFor();
  await screenshot('pharmacyB', '08-pharmacy-b-reconnected-synced.png');

  // The operator: live counts, then approve the pending demo pharmacy E.
  const admin = demo.admins[0];
  const pd = await open('admin');
  await signIn(pd, admin.email, admin.password);
  const row = pd.locator('tr[data-testid^=pending-]', { hasText: byKey.E.pharmacy_name });
  await row.waitFor();
  const eId = (await row.getAttribute('data-testid')).replace('pending-', '');
  await eventually('the stats', async () =>
    (await pd.getByTestId('stat-sockets-pharmacy').textContent()) === '2' &&
    (await pd.getByTestId('stat-sockets-customer').textContent()) === '1' &&
    (await pd.locator('[data-testid=funnel-created] .num').textContent()) === '3' &&
    (await pd.locator('[data-testid=funnel-accepted] .num').textContent()) === '2' &&
    (await pd.locator('[data-testid=funnel-cancelled] .num').textContent()) === '1' &&
    Number(await pd.getByTestId('stat-rpm').textContent()) >= 1);
  await screenshot('admin', '09-admin-before-approval.png');
  await pd.getByTestId(`approve-${eId}`).click();
  await pd.getByTestId(`approved-${eId}`).waitFor();
  assert.equal(await pd.getByTestId(`pending-${eId}`).count(), 0);
  await pd.getByTestId('pending-count').filter({ hasText: /^0$/ }).waitFor();

  // E, now approved, goes live.
  const pe = await open('pharmacyE');
  await signIn(pe, byKey.E.email, byKey.E.password);
  await live(pe);
  await eventually('three pharmacy sockets in the stats', async () => (await pd.getByTestId('stat-sockets-pharmacy').textContent()) === '3');
  await screenshot('admin', '10-admin-approved.png');
  await screenshot('customer', '11-customer-final.png');

  assert.deepEqual(problems, [], 'no console errors and no page errors');
});
