// Sanjevani console. Plain modern JavaScript, no build step, no framework, nothing fetched from
// outside this server: it must work with no internet. It speaks only the public API
// (API.md): /login and /token/refresh, the customer's and pharmacy's HTTP endpoints, the admin
// endpoints, and the WebSockets /ws/customer/ and /ws/pharmacy/.
//
// Tokens live in memory only (a reload signs out) and the access token is refreshed before it
// expires. User-supplied text is only ever put into the page as text nodes, never as HTML.
'use strict';

(() => {
  const $ = (id) => document.getElementById(id);
  const SVG_NS = 'http://www.w3.org/2000/svg';
  const DEFAULT_CENTER = { lat: 27.7172, lng: 85.324 };

  // ------------------------------------------------------------------ DOM helpers

  function build(el, attrs, children) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
      else if (k === 'text') el.textContent = v;
      else el.setAttribute(k, v === true ? '' : String(v));
    }
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }
  const h = (tag, attrs, ...children) => build(document.createElement(tag), attrs, children);
  const s = (tag, attrs, ...children) => build(document.createElementNS(SVG_NS, tag), attrs, children);
  /** Replaces an element's children (null and false are skipped, unlike `replaceChildren`). */
  const fill = (el, ...children) => {
    el.replaceChildren();
    return build(el, null, children);
  };

  const fmtKm = (km) => `${Number(km).toFixed(2)} km`;
  const fmtTime = (iso) => {
    const d = iso ? new Date(iso) : new Date();
    return Number.isNaN(d.getTime()) ? String(iso) : d.toLocaleTimeString();
  };
  const fmtCoord = (lat, lng) => `${Number(lat).toFixed(5)}, ${Number(lng).toFixed(5)}`;

  let toastTimer = null;
  function toast(text) {
    const el = $('toast');
    el.textContent = text;
    el.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { el.hidden = true; }, 5000);
  }

  function logEvent(listId, text) {
    const list = $(listId);
    list.prepend(h('li', null, h('span', { class: 't' }, new Date().toLocaleTimeString(), ' '), text));
    while (list.children.length > 100) list.lastChild.remove();
  }

  function randomKey() {
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
  }

  // ------------------------------------------------------------------ session and HTTP

  const session = { access: null, refresh: null, role: null, name: null, userId: null, timer: null, epoch: 0 };
  let refreshing = null;

  function claims(token) {
    try {
      const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
      return JSON.parse(atob(part.padEnd(Math.ceil(part.length / 4) * 4, '=')));
    } catch {
      return {};
    }
  }

  /** Keeps the access token and schedules its refresh well before it expires. */
  function setAccess(token) {
    session.access = token;
    clearTimeout(session.timer);
    const c = claims(token);
    // The token's own lifetime, measured from now: the browser's clock may differ from the server's.
    const life = c.exp && c.iat ? c.exp - c.iat : 300;
    const delay = Math.max(5, Math.min(life - 30, life * 0.8));
    session.timer = setTimeout(() => refreshAccess(), delay * 1000);
  }

  /** One refresh at a time; false if it failed (a rejected refresh token signs out). */
  function refreshAccess() {
    if (refreshing) return refreshing;
    const epoch = session.epoch;
    refreshing = (async () => {
      try {
        const data = await api('POST', '/token/refresh', { json: { refresh: session.refresh }, auth: false });
        if (epoch !== session.epoch) return false;
        setAccess(data.access);
        return true;
      } catch (e) {
        if (epoch !== session.epoch) return false;
        if (e.status === 401) signOut('Your session has expired; please sign in again.');
        else {
          clearTimeout(session.timer);
          session.timer = setTimeout(() => refreshAccess(), 10000);
        }
        return false;
      } finally {
        refreshing = null;
      }
    })();
    return refreshing;
  }

  class ApiError extends Error {
    constructor(status, data) {
      super((data && data.error) || `HTTP ${status}`);
      this.status = status;
      this.data = data;
    }
  }

  /** A JSON API call; a 401 refreshes the access token once and retries. */
  async function api(method, path, { json, form, headers = {}, auth = true, retried = false } = {}) {
    const h2 = { ...headers };
    let body;
    if (json !== undefined) {
      h2['Content-Type'] = 'application/json';
      body = JSON.stringify(json);
    } else if (form) {
      body = form;
    }
    if (auth && session.access) h2.Authorization = `Bearer ${session.access}`;
    let res;
    try {
      res = await fetch(path, { method, headers: h2, body, cache: 'no-store' });
    } catch {
      throw new ApiError(0, { error: 'The server cannot be reached' });
    }
    const text = await res.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = { error: text };
    }
    if (res.status === 401 && auth && !retried && session.refresh) {
      if (await refreshAccess()) return api(method, path, { json, form, headers, auth, retried: true });
    }
    if (!res.ok) throw new ApiError(res.status, data);
    return data;
  }

  // ------------------------------------------------------------------ live sockets

  function setWsStatus(state, text) {
    const el = $('ws-status');
    el.dataset.state = state;
    el.textContent = text;
  }

  /** A WebSocket that reconnects with exponential backoff and jitter (1 s doubling to 30 s). */
  class LiveSocket {
    constructor(path, onMessage, logId) {
      this.path = path;
      this.onMessage = onMessage;
      this.logId = logId;
      this.ws = null;
      this.attempt = 0;
      this.timer = null;
      this.ping = null;
      this.stopped = true;
      this.onOnline = () => { if (!this.ws && !this.stopped) this.connect(); };
    }

    start() {
      this.stopped = false;
      window.addEventListener('online', this.onOnline);
      this.connect();
    }

    connect() {
      clearTimeout(this.timer);
      if (this.stopped || this.ws) return;
      const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
      const ws = new WebSocket(`${proto}//${location.host}${this.path}?token=${encodeURIComponent(session.access)}`);
      this.ws = ws;
      setWsStatus('connecting', 'connecting…');
      ws.onmessage = (ev) => {
        let msg;
        try {
          msg = JSON.parse(ev.data);
        } catch {
          return;
        }
        if (msg.type === 'connection') {
          this.attempt = 0;
          setWsStatus('open', 'live');
        }
        if (msg.type !== 'pong') this.onMessage(msg);
      };
      ws.onclose = (ev) => this.closed(ws, ev.code);
      // The server closes sockets silent for 60 s; browsers answer its pings, and this keeps
      // proxies that do not pass pings from cutting the connection.
      this.ping = setInterval(() => { if (ws.readyState === WebSocket.OPEN) ws.send('{"type":"ping"}'); }, 25000);
    }

    closed(ws, code) {
      clearInterval(this.ping);
      if (ws !== this.ws || this.stopped) return;
      this.ws = null;
      let delay = Math.min(30000, 1000 * 2 ** this.attempt) * (0.5 + Math.random() / 2);
      this.attempt += 1;
      let why = `closed (${code})`;
      if (code === 4004) {
        setWsStatus('closed', 'no pharmacy record (4004)');
        logEvent(this.logId, 'closed 4004: this account has no pharmacy record');
        return;
      }
      if (code === 4003) {
        why = 'not approved or suspended (4003)';
        delay = 60000;
      }
      setWsStatus('reconnecting', `${why}; retrying in ${Math.ceil(delay / 1000)} s`);
      logEvent(this.logId, `connection ${why}; retrying in ${(delay / 1000).toFixed(1)} s`);
      this.timer = setTimeout(async () => {
        if (code === 4001) await refreshAccess();
        this.connect();
      }, delay);
    }

    stop() {
      this.stopped = true;
      clearTimeout(this.timer);
      clearInterval(this.ping);
      window.removeEventListener('online', this.onOnline);
      const ws = this.ws;
      this.ws = null;
      if (!ws) return;
      // Closing a socket that is still connecting makes the browser log an error; wait for it.
      if (ws.readyState === WebSocket.CONNECTING) ws.onopen = () => ws.close(1000);
      else ws.close(1000);
    }
  }

  // ------------------------------------------------------------------ the map

  const MAP_W = 600;
  const MAP_H = 420;

  function niceStep(km) {
    const steps = [0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000];
    let best = steps[0];
    for (const st of steps) if (st <= km) best = st;
    return best;
  }

  /**
   * Draws points and circles on an equirectangular projection around `center`, scaled so that
   * `extentKm` fits from the centre to the nearest edge, with a km grid, a scale bar and north.
   */
  function drawMap(svg, { center, extentKm, circles = [], points = [], rays = [] }) {
    const kx = Math.max(1e-6, 111.32 * Math.cos((center.lat * Math.PI) / 180));
    const ky = 110.574;
    const scale = (Math.min(MAP_W, MAP_H) / 2 - 18) / Math.max(extentKm, 0.2); // px per km
    const px = (p) => [MAP_W / 2 + (p.lng - center.lng) * kx * scale, MAP_H / 2 - (p.lat - center.lat) * ky * scale];
    svg.unproject = (x, y) => ({
      lat: center.lat - (y - MAP_H / 2) / (ky * scale),
      lng: center.lng + (x - MAP_W / 2) / (kx * scale),
    });
    const step = niceStep(MAP_W / 5 / scale);
    const stepPx = step * scale;
    const nodes = [];
    for (let x = (MAP_W / 2) % stepPx; x < MAP_W; x += stepPx) {
      nodes.push(s('line', { class: 'grid-line', x1: x, y1: 0, x2: x, y2: MAP_H }));
    }
    for (let y = (MAP_H / 2) % stepPx; y < MAP_H; y += stepPx) {
      nodes.push(s('line', { class: 'grid-line', x1: 0, y1: y, x2: MAP_W, y2: y }));
    }
    for (const c of circles) {
      const [cx, cy] = px(c);
      nodes.push(s('circle', { class: `radius ${c.cls || ''}`, cx, cy, r: c.km * scale, 'data-testid': c.testid }));
    }
    for (const r of rays) {
      const [x1, y1] = px(r.from);
      const [x2, y2] = px(r.to);
      nodes.push(s('line', { class: 'ray', x1, y1, x2, y2 }));
    }
    for (const p of points) {
      const [cx, cy] = px(p);
      nodes.push(s('g', { 'data-testid': p.testid },
        s('circle', { class: `pt ${p.cls}`, cx, cy, r: p.r || 6 }, s('title', null, p.title || p.label || '')),
        p.label ? s('text', { x: cx + 9, y: cy - 8 }, p.label) : null));
    }
    const sx = 16;
    const sy = MAP_H - 18;
    const label = step < 1 ? `${Math.round(step * 1000)} m` : `${step} km`;
    nodes.push(s('g', { 'data-testid': 'map-scale' },
      s('path', { class: 'scale', d: `M${sx} ${sy - 5}V${sy}H${sx + stepPx}V${sy - 5}` }),
      s('text', { x: sx + stepPx + 6, y: sy + 4 }, label)));
    nodes.push(s('text', { class: 'north', x: MAP_W - 22, y: 22 }, 'N ↑'));
    svg.replaceChildren(...nodes);
  }

  function enableMapPicking(svg, onPick) {
    svg.addEventListener('click', (ev) => {
      if (!svg.unproject) return;
      const pt = svg.createSVGPoint();
      pt.x = ev.clientX;
      pt.y = ev.clientY;
      const local = pt.matrixTransform(svg.getScreenCTM().inverse());
      onPick(svg.unproject(local.x, local.y));
    });
  }

  // ------------------------------------------------------------------ customer

  const customer = { requests: new Map(), selected: null, socket: null };

  function draftLocation() {
    const lat = parseFloat($('req-lat').value);
    const lng = parseFloat($('req-lng').value);
    if (!Number.isFinite(lat) || !Number.isFinite(lng) || Math.abs(lat) > 90 || Math.abs(lng) > 180) return null;
    return { lat, lng };
  }

  function winnerOf(r) {
    if (!r) return null;
    if (r.pharmacy) return r.pharmacy;
    const won = (r.responses || []).find((x) => x.response_type === 'ACCEPTED');
    return won ? won.pharmacy_id : null;
  }

  function drawCustomerMap() {
    const draft = draftLocation() || DEFAULT_CENTER;
    const radius = Number($('req-radius').value);
    const r = customer.requests.get(customer.selected);
    const circles = [];
    const points = [];
    const rays = [];
    let extent = radius;
    if (r) {
      const patient = { lat: r.patient_lat, lng: r.patient_lng };
      circles.push({ ...patient, km: r.radius_km, testid: 'map-radius' });
      const winner = winnerOf(r);
      const rejected = new Set((r.responses || []).filter((x) => x.response_type === 'REJECTED').map((x) => x.pharmacy_id));
      for (const n of r.notified || []) {
        const cls = n.pharmacy_id === winner ? 'winner' : rejected.has(n.pharmacy_id) ? 'rejected' : 'notified';
        points.push({
          lat: n.lat, lng: n.lng, cls, r: cls === 'winner' ? 8 : 6, testid: `map-pharmacy-${n.pharmacy_id}`,
          label: n.pharmacy_name, title: `${n.pharmacy_name}: ${fmtKm(n.distance_km)}`,
        });
        if (cls === 'winner') rays.push({ from: patient, to: n });
      }
      points.push({ ...patient, cls: 'patient', r: 7, testid: 'map-patient', title: `Request #${r.id}` });
      const dx = (draft.lng - patient.lng) * 111.32 * Math.cos((draft.lat * Math.PI) / 180);
      const dy = (draft.lat - patient.lat) * 110.574;
      extent = Math.max(extent, r.radius_km + Math.hypot(dx, dy));
    }
    const same = r && Math.abs(r.patient_lat - draft.lat) < 1e-9 && Math.abs(r.patient_lng - draft.lng) < 1e-9;
    if (!same || Number(r.radius_km) !== radius) circles.push({ ...draft, km: radius, cls: 'draft', testid: 'map-draft-radius' });
    if (!same) points.push({ ...draft, cls: 'draft', r: 7, testid: 'map-draft', title: 'New request here' });
    drawMap($('customer-map'), { center: draft, extentKm: extent * 1.08, circles, points, rays });
  }

  function renderMyRequests() {
    const list = $('my-requests');
    const items = [...customer.requests.values()].sort((a, b) => b.id - a.id);
    fill(list, ...items.map((r) => h('li', {
      'data-testid': `my-request-${r.id}`,
      class: r.id === customer.selected ? 'selected' : null,
      onclick: () => selectRequest(r.id, true),
    },
    h('span', null, `#${r.id} ${r.medicine_name || 'Medicine'} × ${r.quantity}`,
      h('span', { class: 'muted small' }, `  ${fmtTime(r.created_at)} · ${r.radius_km} km`)),
    h('span', { class: `status ${r.status}` }, r.status))));
    if (!items.length) list.append(h('li', { class: 'muted' }, 'No requests yet.'));
  }

  function renderDetail() {
    const box = $('request-detail');
    const r = customer.requests.get(customer.selected);
    if (!r) {
      fill(box, h('p', { class: 'muted' }, 'Post a request or pick one from the list.'));
      return;
    }
    const winner = winnerOf(r);
    const notifiedCount = r.pharmacies_notified ?? (r.notified ? r.notified.length : null);
    const responses = r.responses || [];
    fill(box,
      h('div', { class: 'row' },
        h('div', { class: 'grow' },
          h('div', { class: 'big' }, `#${r.id} ${r.medicine_name || 'Medicine'} × ${r.quantity}`),
          h('span', { class: `status ${r.status}`, 'data-testid': 'request-status' }, r.status),
          r.pharmacy_name ? h('span', { class: 'muted' }, ` — ${r.pharmacy_name}`) : null),
        r.image ? h('a', { href: r.image, target: '_blank', rel: 'noopener' },
          h('img', { class: 'preview', src: r.image, alt: 'Prescription', 'data-testid': 'request-image' })) : null),
      h('dl', { class: 'kv' },
        h('dt', null, 'Pharmacies notified'),
        h('dd', { 'data-testid': 'pharmacies-notified' }, notifiedCount === null ? '…' : String(notifiedCount)),
        h('dt', null, 'Radius'), h('dd', null, `${r.radius_km} km around ${fmtCoord(r.patient_lat, r.patient_lng)}`),
        h('dt', null, 'Posted'), h('dd', null, fmtTime(r.created_at)),
        r.note ? [h('dt', null, 'Note'), h('dd', null, r.note)] : null,
        r.notified && r.notified.length
          ? [h('dt', null, 'Notified'), h('dd', null, r.notified.map((n) => `${n.pharmacy_name} (${fmtKm(n.distance_km)})`).join(', '))]
          : null),
      h('h3', null, `Responses (${responses.length})`),
      h('ul', { class: 'responses', 'data-testid': 'responses' },
        responses.length ? responses.map((x) => {
          const won = x.response_type === 'ACCEPTED' && x.pharmacy_id === winner;
          return h('li', {
            class: `${x.response_type}${won ? ' winner' : ''}`,
            'data-testid': `response-${x.pharmacy_id}`,
            'data-response-type': x.response_type,
            'data-winner': won ? 'true' : 'false',
          },
          h('span', { class: 'tag' }, won ? 'ACCEPTED — winner' : x.response_type), ' ',
          h('strong', null, x.pharmacy_name),
          x.distance_km !== undefined ? h('span', { class: 'muted' }, ` · ${fmtKm(x.distance_km)}`) : null,
          h('span', { class: 'muted small' }, ` · ${fmtTime(x.responded_at)}`),
          x.text_message ? h('div', null, `“${x.text_message}”`) : null,
          x.audio ? h('audio', { controls: true, preload: 'none', src: x.audio }) : null);
        }) : h('li', { class: 'muted' }, r.status === 'PENDING' ? 'Waiting for pharmacies…' : 'No responses.')),
      r.status === 'PENDING'
        ? h('button', { type: 'button', class: 'danger', 'data-testid': 'cancel-request', onclick: () => cancelRequest(r.id) }, 'Cancel request')
        : null,
    );
  }

  function renderCustomer() {
    renderMyRequests();
    renderDetail();
    drawCustomerMap();
  }

  function mergeRequest(data) {
    const old = customer.requests.get(data.id) || {};
    const merged = { ...old, ...data };
    if (old.pharmacies_notified !== undefined && data.pharmacies_notified === undefined) {
      merged.pharmacies_notified = old.pharmacies_notified;
    }
    customer.requests.set(data.id, merged);
    return merged;
  }

  async function loadRequests() {
    const epoch = session.epoch;
    const data = await api('GET', '/medicine/request/');
    if (epoch !== session.epoch) return;
    for (const r of data.requests) mergeRequest(r);
    renderCustomer();
  }

  async function loadDetail(id) {
    const epoch = session.epoch;
    try {
      const data = await api('GET', `/medicine/request/${id}/`);
      if (epoch !== session.epoch) return;
      const r = mergeRequest(data);
      if (r.notified) r.pharmacies_notified = r.notified.length;
      renderCustomer();
    } catch (e) {
      if (epoch === session.epoch) toast(`Request #${id}: ${e.message}`);
    }
  }

  function selectRequest(id, useAsTemplate) {
    customer.selected = id;
    const r = customer.requests.get(id);
    if (r && useAsTemplate) {
      $('req-lat').value = r.patient_lat;
      $('req-lng').value = r.patient_lng;
      $('req-radius').value = Math.round(r.radius_km);
      $('req-radius-value').textContent = `${$('req-radius').value} km`;
    }
    renderCustomer();
    loadDetail(id);
  }

  async function submitRequest(ev) {
    ev.preventDefault();
    const err = $('req-error');
    err.textContent = '';
    const where = draftLocation();
    if (!where) {
      err.textContent = 'Enter a valid latitude (−90…90) and longitude (−180…180), or click the map.';
      return;
    }
    const form = new FormData();
    form.set('patient_lat', String(where.lat));
    form.set('patient_lng', String(where.lng));
    form.set('radius_km', $('req-radius').value);
    form.set('quantity', $('req-quantity').value);
    const name = $('req-medicine').value.trim();
    const note = $('req-note').value.trim();
    if (name) form.set('medicine_name', name);
    if (note) form.set('note', note);
    const file = $('req-image').files[0];
    if (file) form.set('image', file, file.name);
    const button = ev.submitter || $('request-form').querySelector('button[type=submit]');
    button.disabled = true;
    try {
      // A retried submission (double click, lost reply) creates nothing new.
      const data = await api('POST', '/medicine/request/', { form, headers: { 'Idempotency-Key': randomKey() } });
      const r = mergeRequest({ ...data.data, pharmacies_notified: data.pharmacies_notified, responses: [], notified: [] });
      logEvent('customer-log', `request #${r.id} sent to ${data.pharmacies_notified} pharmacies`);
      toast(data.message);
      selectRequest(r.id, false);
    } catch (e) {
      err.textContent = e.message;
    } finally {
      button.disabled = false;
    }
  }

  async function cancelRequest(id) {
    try {
      const data = await api('POST', `/medicine/request/${id}/cancel/`);
      mergeRequest({ id, status: data.status });
      toast(data.message);
      renderCustomer();
    } catch (e) {
      toast(e.message);
    }
    loadDetail(id);
  }

  function onCustomerMessage(msg) {
    switch (msg.type) {
      case 'connection':
        logEvent('customer-log', `connected as ${msg.user_name}`);
        break;
      case 'pharmacy_response': {
        const r = customer.requests.get(msg.request_id);
        logEvent('customer-log', `${msg.pharmacy_name} ${msg.response_type} request #${msg.request_id}` +
          ` (${fmtKm(msg.distance_km)})${msg.text_message ? `: “${msg.text_message}”` : ''}`);
        if (!r) {
          // Posted from another device: read it over HTTP.
          loadRequests().catch(() => {});
          break;
        }
        const responses = r.responses || (r.responses = []);
        if (!responses.some((x) => x.pharmacy_id === msg.pharmacy_id && x.response_type === msg.response_type)) {
          responses.push({ ...msg, audio: msg.audio_url });
        }
        if (msg.response_type === 'ACCEPTED') {
          mergeRequest({ id: msg.request_id, status: 'ACCEPTED', pharmacy: msg.pharmacy_id, pharmacy_name: msg.pharmacy_name });
        }
        if (msg.response_type === 'ACCEPTED') toast(`${msg.pharmacy_name} accepted request #${msg.request_id}`);
        renderCustomer();
        loadDetail(msg.request_id);
        break;
      }
      case 'request_cancelled':
      case 'request_expired': {
        const status = msg.type === 'request_expired' ? 'EXPIRED' : 'CANCELLED';
        if (customer.requests.has(msg.request_id)) mergeRequest({ id: msg.request_id, status });
        logEvent('customer-log', `request #${msg.request_id} ${status.toLowerCase()}`);
        renderCustomer();
        break;
      }
      case 'sync':
        // What happened while this socket was away: statuses first, then the details over HTTP.
        for (const c of msg.closed || []) {
          if (customer.requests.has(c.request_id)) mergeRequest({ id: c.request_id, status: c.status });
        }
        logEvent('customer-log', `sync: ${msg.pending.length} pending, ${(msg.closed || []).length} recently closed`);
        loadRequests().catch(() => {});
        if (customer.selected) loadDetail(customer.selected);
        break;
      case 'error':
        logEvent('customer-log', `server: ${msg.message}`);
        break;
      default:
        logEvent('customer-log', `${msg.type}`);
    }
  }

  function enterCustomer() {
    customer.requests.clear();
    customer.selected = null;
    if (!draftLocation()) {
      $('req-lat').value = DEFAULT_CENTER.lat;
      $('req-lng').value = DEFAULT_CENTER.lng;
    }
    fill($('customer-log'));
    renderCustomer();
    loadRequests().catch((e) => toast(e.message));
    customer.socket = new LiveSocket('/ws/customer/', onCustomerMessage, 'customer-log');
    customer.socket.start();
  }

  // ------------------------------------------------------------------ pharmacy

  // `open`: requests this pharmacy may still answer. `closed`: ids that left that state; a
  // request never returns to PENDING, so a late replayed copy of a closed one is ignored.
  const pharmacy = { open: new Map(), closed: new Map(), self: null, socket: null };

  const CLOSED_TEXT = {
    taken: 'taken by another pharmacy',
    cancelled: 'cancelled by the customer',
    expired: 'expired',
    accepted: 'accepted by you',
    rejected: 'rejected by you',
    gone: 'no longer open',
  };

  function closeIncoming(id, state, detail) {
    if (pharmacy.closed.has(id)) return;
    const req = pharmacy.open.get(id) || { request_id: id };
    pharmacy.open.delete(id);
    pharmacy.closed.set(id, { req, state, at: new Date(), detail });
    renderPharmacy();
  }

  function incomingCard(r) {
    const id = r.request_id;
    const message = h('input', { placeholder: 'Message to the customer (optional)', 'data-testid': `message-${id}`, maxlength: 1000 });
    const respond = async (type, button) => {
      for (const b of button.parentElement.querySelectorAll('button')) b.disabled = true;
      try {
        const body = { request_id: id, response_type: type };
        if (message.value.trim()) body.text_message = message.value.trim();
        await api('POST', '/medicine/response/', { json: body });
        logEvent('pharmacy-log', `you ${type.toLowerCase()} request #${id}`);
        closeIncoming(id, type === 'ACCEPTED' ? 'accepted' : 'rejected');
      } catch (e) {
        toast(`#${id}: ${e.message}`);
        if (e.status === 400 && /assigned/.test(e.message)) closeIncoming(id, 'taken', e.message);
        else if (e.status === 400 || e.status === 404 || e.status === 409) closeIncoming(id, 'gone', e.message);
        else for (const b of button.parentElement.querySelectorAll('button')) b.disabled = false;
      }
    };
    return h('li', { 'data-testid': `incoming-${id}`, 'data-state': 'open', 'data-request-id': id, class: r.replay ? null : 'fresh' },
      r.image_url
        ? h('a', { href: r.image_url, target: '_blank', rel: 'noopener' },
          h('img', { class: 'thumb', src: r.image_url, alt: 'Prescription', 'data-testid': `incoming-image-${id}` }))
        : null,
      h('div', { class: 'body' },
        h('div', { class: 'title' }, `#${id} ${r.medicine_name || 'Medicine'} × ${r.quantity}`),
        h('div', null, h('span', { class: 'distance', 'data-testid': `distance-${id}` }, fmtKm(r.distance_km)), ' away · ',
          r.patient_name, ' · ', r.patient_phone,
          h('span', { class: 'muted small' }, ` · ${fmtTime(r.timestamp)}`),
          r.replay ? h('span', { class: 'badge', title: 'Sent again on reconnect' }, 'replayed') : null),
        r.note ? h('div', { class: 'muted' }, `“${r.note}”`) : null,
        h('div', { class: 'actions' },
          message,
          h('button', { type: 'button', 'data-testid': `accept-${id}`, onclick: (ev) => respond('ACCEPTED', ev.currentTarget) }, 'Accept'),
          h('button', { type: 'button', class: 'secondary', 'data-testid': `reject-${id}`, onclick: (ev) => respond('REJECTED', ev.currentTarget) }, 'Reject'))));
  }

  function renderPharmacy() {
    const list = $('incoming');
    const wanted = [...pharmacy.open.values()].sort((a, b) => a.distance_km - b.distance_km || a.request_id - b.request_id);
    const existing = new Map([...list.children].map((li) => [Number(li.dataset.requestId), li]));
    for (const [id, li] of existing) if (!pharmacy.open.has(id)) li.remove();
    let prev = null;
    for (const r of wanted) {
      let li = existing.get(r.request_id);
      if (!li || !li.isConnected) li = incomingCard(r);
      const want = prev ? prev.nextSibling : list.firstChild;
      if (li !== want) list.insertBefore(li, want);
      prev = li;
    }
    $('incoming-count').textContent = String(wanted.length);
    $('incoming-empty').hidden = wanted.length > 0;

    const closed = [...pharmacy.closed.entries()].reverse().slice(0, 50);
    fill($('closed'), ...closed.map(([id, c]) => h('li', { 'data-testid': `closed-${id}`, 'data-state': c.state },
      h('span', { class: `status ${c.state === 'accepted' ? 'ACCEPTED' : 'CANCELLED'}` }, c.state.toUpperCase()), ' ',
      `#${id} ${c.req.medicine_name || ''}${c.req.quantity ? ` × ${c.req.quantity}` : ''} — ${c.detail || CLOSED_TEXT[c.state]}`,
      h('span', { class: 'muted small' }, ` · ${c.at.toLocaleTimeString()}`))));
    if (!closed.length) $('closed').append(h('li', { class: 'muted' }, 'Nothing yet.'));
    drawPharmacyMap();
  }

  function drawPharmacyMap() {
    const self = pharmacy.self;
    const svg = $('pharmacy-map');
    if (!self) {
      fill(svg);
      return;
    }
    let extent = 2;
    const points = [];
    for (const r of pharmacy.open.values()) {
      extent = Math.max(extent, r.distance_km * 1.15);
      points.push({ ...r.patient_location, cls: 'patient', label: `#${r.request_id}`, testid: `map-request-${r.request_id}`,
        title: `#${r.request_id}: ${fmtKm(r.distance_km)}` });
    }
    points.push({ lat: self.lat, lng: self.lng, cls: 'self', r: 8, label: self.name, testid: 'map-self' });
    drawMap(svg, { center: self, extentKm: extent, points });
  }

  function onPharmacyMessage(msg) {
    switch (msg.type) {
      case 'connection':
        pharmacy.self = { name: msg.pharmacy_name, lat: msg.location.lat, lng: msg.location.lng };
        $('pharmacy-where').textContent = `${msg.pharmacy_name} · ${fmtCoord(msg.location.lat, msg.location.lng)}`;
        logEvent('pharmacy-log', `connected as ${msg.pharmacy_name}`);
        renderPharmacy();
        break;
      case 'new_request': {
        const id = msg.request_id;
        if (pharmacy.closed.has(id)) break;
        const known = pharmacy.open.has(id);
        pharmacy.open.set(id, { ...(pharmacy.open.get(id) || {}), ...msg, replay: known ? pharmacy.open.get(id).replay : msg.replay });
        if (!known) {
          logEvent('pharmacy-log', `${msg.replay ? 'replayed' : 'new'} request #${id}: ${msg.medicine_name || 'medicine'} × ${msg.quantity}, ${fmtKm(msg.distance_km)} away`);
          if (!msg.replay) toast(`New request #${id}, ${fmtKm(msg.distance_km)} away`);
        }
        renderPharmacy();
        break;
      }
      case 'sync': {
        // The server's snapshot taken after this socket subscribed: anything else shown as open
        // was closed while the socket was away.
        const pending = new Set(msg.pending);
        let dropped = 0;
        for (const id of [...pharmacy.open.keys()]) {
          if (!pending.has(id)) {
            closeIncoming(id, 'gone', 'closed while this console was away');
            dropped += 1;
          }
        }
        logEvent('pharmacy-log', `sync: ${pending.size} open${dropped ? `, ${dropped} closed while away` : ''}`);
        renderPharmacy();
        break;
      }
      case 'request_taken':
        logEvent('pharmacy-log', `request #${msg.request_id} taken by another pharmacy`);
        closeIncoming(msg.request_id, 'taken');
        break;
      case 'request_cancelled':
        logEvent('pharmacy-log', `request #${msg.request_id} cancelled`);
        closeIncoming(msg.request_id, 'cancelled');
        break;
      case 'request_expired':
        logEvent('pharmacy-log', `request #${msg.request_id} expired`);
        closeIncoming(msg.request_id, 'expired');
        break;
      case 'error':
        logEvent('pharmacy-log', `server: ${msg.message}`);
        break;
      default:
        logEvent('pharmacy-log', `${msg.type}`);
    }
  }

  function enterPharmacy() {
    pharmacy.open.clear();
    pharmacy.closed.clear();
    pharmacy.self = null;
    fill($('incoming'));
    $('pharmacy-where').textContent = '';
    fill($('pharmacy-log'));
    renderPharmacy();
    pharmacy.socket = new LiveSocket('/ws/pharmacy/', onPharmacyMessage, 'pharmacy-log');
    pharmacy.socket.start();
  }

  // ------------------------------------------------------------------ operator

  const admin = { timer: null, pendingJson: '', approvedJson: '' };
  const FUNNEL = ['created', 'notified', 'delivered', 'accepted', 'rejected', 'cancelled', 'expired'];

  function renderStats(st) {
    $('stat-sockets-customer').textContent = st.sockets.customer;
    $('stat-sockets-pharmacy').textContent = st.sockets.pharmacy;
    $('stat-rpm').textContent = st.requests_last_minute;
    $('stat-pending').textContent = st.requests.pending;
    $('stat-slow-cuts').textContent = st.slow_consumer_cuts;
    $('stats-updated').textContent = `updated ${new Date().toLocaleTimeString()}`;
    const max = Math.max(1, ...FUNNEL.map((k) => st.requests[k]));
    const funnel = $('funnel');
    if (!funnel.children.length) {
      funnel.append(...FUNNEL.map((k) => h('div', { class: 'bar', 'data-testid': `funnel-${k}` },
        h('span', null, k), h('div', { class: 'track' }, h('div', { class: `fill ${k}` })), h('span', { class: 'num' }, '0'))));
    }
    FUNNEL.forEach((k, i) => {
      const bar = funnel.children[i];
      bar.querySelector('.fill').style.width = `${(100 * st.requests[k]) / max}%`;
      bar.querySelector('.num').textContent = String(st.requests[k]);
    });
  }

  function pharmacyRows(list, pending) {
    return list.map((p) => h('tr', { 'data-testid': `${pending ? 'pending' : 'approved'}-${p.id}` },
      h('td', null, h('strong', null, p.pharmacy_name), h('div', { class: 'muted small' }, fmtCoord(p.lat, p.lng))),
      h('td', null, p.name, h('div', { class: 'muted small' }, p.email), h('div', { class: 'muted small' }, p.phone_number)),
      pending ? h('td', { class: 'small' }, new Date(p.created_at).toLocaleString()) : null,
      h('td', { class: 'actions' },
        pending ? h('button', { type: 'button', 'data-testid': `approve-${p.id}`, onclick: (ev) => setApproval(p, true, ev.currentTarget) }, 'Approve') : null,
        h('button', { type: 'button', class: 'danger', 'data-testid': `suspend-${p.id}`, onclick: (ev) => setApproval(p, false, ev.currentTarget) }, 'Suspend'))));
  }

  function renderPharmacies(pendingList, approvedList) {
    const pj = JSON.stringify(pendingList);
    const aj = JSON.stringify(approvedList);
    // Rebuilt only on change, so that a poll never swaps a button out from under a click.
    if (pj !== admin.pendingJson) {
      admin.pendingJson = pj;
      const rows = pharmacyRows(pendingList, true);
      fill($('pending-pharmacies'), ...(rows.length ? rows : [h('tr', null, h('td', { colspan: 4, class: 'muted' }, 'No pharmacy is waiting.'))]));
      $('pending-count').textContent = String(pendingList.length);
    }
    if (aj !== admin.approvedJson) {
      admin.approvedJson = aj;
      const rows = pharmacyRows(approvedList, false);
      fill($('approved-pharmacies'), ...(rows.length ? rows : [h('tr', null, h('td', { colspan: 3, class: 'muted' }, 'None.'))]));
      $('approved-count').textContent = String(approvedList.length);
    }
  }

  async function pollAdmin() {
    const epoch = session.epoch;
    clearTimeout(admin.timer);
    try {
      const [stats, pending, approved] = await Promise.all([
        api('GET', '/admin/stats'),
        api('GET', '/admin/pharmacies/?approved=false'),
        api('GET', '/admin/pharmacies/?approved=true'),
      ]);
      if (epoch !== session.epoch) return;
      renderStats(stats);
      renderPharmacies(pending.pharmacies, approved.pharmacies);
      $('admin-error').textContent = '';
      setWsStatus('open', 'polling every 3 s');
    } catch (e) {
      if (epoch !== session.epoch) return;
      $('admin-error').textContent = e.message;
      setWsStatus('reconnecting', 'stats unavailable');
    }
    if (epoch === session.epoch) admin.timer = setTimeout(pollAdmin, 3000);
  }

  async function setApproval(p, approve, button) {
    button.disabled = true;
    try {
      await api('POST', `/admin/pharmacies/${p.id}/${approve ? 'approve' : 'suspend'}/`);
      toast(`${p.pharmacy_name} ${approve ? 'approved' : 'suspended'}`);
    } catch (e) {
      toast(`${p.pharmacy_name}: ${e.message}`);
      button.disabled = false;
    }
    pollAdmin();
  }

  function enterAdmin() {
    admin.pendingJson = '';
    admin.approvedJson = '';
    fill($('funnel'));
    pollAdmin();
  }

  // ------------------------------------------------------------------ sign in / out

  const VIEWS = { CUSTOMER: 'customer-view', PHARMACY: 'pharmacy-view', ADMIN: 'admin-view' };

  function show(viewId) {
    for (const id of ['login-view', ...Object.values(VIEWS)]) $(id).hidden = id !== viewId;
    $('session').hidden = viewId === 'login-view';
  }

  async function signIn(ev) {
    ev.preventDefault();
    const err = $('login-error');
    err.textContent = '';
    const button = ev.submitter;
    if (button) button.disabled = true;
    try {
      const data = await api('POST', '/login', {
        json: { email: $('login-email').value.trim(), password: $('login-password').value },
        auth: false,
      });
      if (!VIEWS[data.role]) throw new ApiError(0, { error: `Unknown role ${data.role}` });
      Object.assign(session, { refresh: data.refresh, role: data.role, name: data.name, userId: data.user_id });
      setAccess(data.access);
      $('login-password').value = '';
      $('whoami').textContent = `${data.name} · ${data.role.toLowerCase()}`;
      document.body.dataset.role = data.role;
      setWsStatus('idle', 'offline');
      show(VIEWS[data.role]);
      if (data.role === 'CUSTOMER') enterCustomer();
      else if (data.role === 'PHARMACY') enterPharmacy();
      else enterAdmin();
    } catch (e) {
      err.textContent = e.message;
    } finally {
      if (button) button.disabled = false;
    }
  }

  function signOut(message) {
    session.epoch += 1;
    clearTimeout(session.timer);
    clearTimeout(admin.timer);
    for (const sock of [customer.socket, pharmacy.socket]) if (sock) sock.stop();
    customer.socket = null;
    pharmacy.socket = null;
    Object.assign(session, { access: null, refresh: null, role: null, name: null, userId: null });
    delete document.body.dataset.role;
    show('login-view');
    $('login-error').textContent = message || '';
  }

  // ------------------------------------------------------------------ wiring

  $('login-form').addEventListener('submit', signIn);
  $('sign-out').addEventListener('click', () => signOut(''));
  $('request-form').addEventListener('submit', submitRequest);
  $('req-radius').addEventListener('input', () => {
    $('req-radius-value').textContent = `${$('req-radius').value} km`;
    drawCustomerMap();
  });
  for (const id of ['req-lat', 'req-lng']) $(id).addEventListener('input', () => { if (draftLocation()) drawCustomerMap(); });
  let previewUrl = null;
  $('req-image').addEventListener('change', () => {
    const file = $('req-image').files[0];
    const img = $('req-image-preview');
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = file ? URL.createObjectURL(file) : null;
    img.hidden = !file;
    if (file) img.src = previewUrl;
    else img.removeAttribute('src');
  });
  enableMapPicking($('customer-map'), (p) => {
    $('req-lat').value = p.lat.toFixed(6);
    $('req-lng').value = p.lng.toFixed(6);
    drawCustomerMap();
  });
  document.body.dataset.ready = 'true';
})();
