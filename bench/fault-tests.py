#!/usr/bin/env python3
"""Clients for bench/fault-tests.sh (stdlib only, loopback only, every loop bounded).

  post URL TOKENS OUT PREFIX --max N --seconds S --threads T
      Customers post requests with unique Idempotency-Keys (the key is also the `note`). Each key is
      written to OUT as {"key","customer"} before it is sent and {"key","id","notified"} once it got
      a 201, flushed per line, so a kill -9 of the server (or of this client) loses nothing. A
      thread stops at its first failed call (the server went away).
  verify URL TOKENS OUT PREFIX [--repost]
      After a restart: every 201'd request exists for its customer with `notified` as long as its
      `pharmacies_notified`; with --repost every key ever sent is posted again (a 201'd key must get
      the same request_id) and then each customer holds exactly one request per key it sent.
  ws-hold URL TOKENS READY OUT --pharmacies N --customers M --seconds S
      Holds raw WebSockets; once each got its `connection` (and `sync`), touches READY; then reads
      until each is closed and writes the close codes to OUT.
  ws-replay URL TOKENS OUT
      Connects the pharmacy notified of most 201'd requests in OUT and checks it gets `new_request`
      replays for its PENDING requests and a `sync` naming exactly them.
  metric URL NAME
      Prints the value of one un-labelled sample from /metrics.
"""
import base64
import concurrent.futures as cf
import json
import os
import socket
import struct
import sys
import threading
import time
import urllib.error
import urllib.request

TIMEOUT = 5


def call(url, method, path, token=None, body=None, headers=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", "Bearer " + token)
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def location(tokens, i):
    c = tokens["city"]["center"]
    # Within ~3 km of the centre: every request has recipients in the dense core.
    return c[0] + ((i * 37) % 50 - 25) * 0.001, c[1] + ((i * 53) % 50 - 25) * 0.001


def post_one(url, tokens, cust, key, i):
    lat, lng = location(tokens, i)
    body = {"patient_lat": lat, "patient_lng": lng, "radius_km": 3, "quantity": 1,
            "medicine_name": "fault test", "note": key}
    return call(url, "POST", "/medicine/request/", cust["access"], body, {"Idempotency-Key": key})


def cmd_post(url, tokens, out, prefix, max_n, seconds, threads):
    customers = tokens["customers"]
    lock = threading.Lock()
    counter = [0]
    deadline = time.monotonic() + seconds
    f = open(out, "a")

    def write(rec):
        with lock:
            f.write(json.dumps(rec) + "\n")
            f.flush()

    def worker(t):
        n = 0
        while time.monotonic() < deadline:
            with lock:
                if counter[0] >= max_n:
                    return n
                i = counter[0]
                counter[0] += 1
            ci = i % len(customers)
            key = f"{prefix}-{i}"
            write({"key": key, "customer": ci})
            try:
                status, raw = post_one(url, tokens, customers[ci], key, i)
            except Exception:
                return n  # the server went away
            if status != 201:
                print(f"post {key}: {status} {raw[:200]!r}", file=sys.stderr)
                return n
            d = json.loads(raw)
            write({"key": key, "id": d["request_id"], "notified": d["pharmacies_notified"]})
            n += 1
        return n

    with cf.ThreadPoolExecutor(threads) as ex:
        total = sum(ex.map(worker, range(threads)))
    print(f"posted: {counter[0]} keys sent, {total} got 201")


def load_log(out, prefix):
    sent, acked = {}, {}
    with open(out) as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue  # a torn last line
            if not r["key"].startswith(prefix + "-"):
                continue
            if "customer" in r:
                sent[r["key"]] = r["customer"]
            else:
                acked[r["key"]] = r
    return sent, acked


def cmd_verify(url, tokens, out, prefix, repost):
    customers = tokens["customers"]
    sent, acked = load_log(out, prefix)
    errors = []

    def check_acked(key):
        a = acked[key]
        status, raw = call(url, "GET", f"/medicine/request/{a['id']}/", customers[sent[key]]["access"])
        if status != 200:
            return f"{key}: request {a['id']} answered {status} after the restart"
        d = json.loads(raw)
        if d.get("note") != key:
            return f"{key}: request {a['id']} has note {d.get('note')!r}"
        if len(d.get("notified", [])) != a["notified"]:
            return f"{key}: request {a['id']} lists {len(d.get('notified', []))} notified, its 201 said {a['notified']}"
        return None

    def repost_one(key):
        i = int(key.rsplit("-", 1)[1])
        status, raw = post_one(url, tokens, customers[sent[key]], key, i)
        if status != 201:
            return f"{key}: re-post answered {status} {raw[:200]!r}"
        rid = json.loads(raw)["request_id"]
        if key in acked and rid != acked[key]["id"]:
            return f"{key}: re-post returned request {rid}, its first 201 said {acked[key]['id']}"
        return None

    with cf.ThreadPoolExecutor(8) as ex:
        errors += [e for e in ex.map(check_acked, list(acked)) if e]
        if repost:
            errors += [e for e in ex.map(repost_one, list(sent)) if e]
    if repost:
        for ci, cust in enumerate(customers):
            status, raw = call(url, "GET", "/medicine/request/", cust["access"])
            if status != 200:
                errors.append(f"customer {ci}: list answered {status}")
                continue
            notes = {}
            for r in json.loads(raw)["requests"]:
                n = r.get("note") or ""
                if n.startswith(prefix + "-"):
                    notes[n] = notes.get(n, 0) + 1
            want = {k for k, c in sent.items() if c == ci}
            for k in want:
                if notes.get(k, 0) != 1:
                    errors.append(f"customer {ci}: {notes.get(k, 0)} requests for key {k}")
            for k in set(notes) - want:
                errors.append(f"customer {ci}: a request for key {k} it never sent")
    for e in errors[:20]:
        print("  " + e, file=sys.stderr)
    print(f"verify: {len(sent)} keys sent, {len(acked)} acknowledged, "
          f"{'re-posted, ' if repost else ''}{len(errors)} errors")
    return 1 if errors else 0


class WS:
    def __init__(self, url, path):
        host, port = url.split("//", 1)[1].split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=TIMEOUT)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise IOError("closed during the handshake")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise IOError(f"handshake: {head[:100]!r}")

    def _need(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("closed without a close frame")
            self.buf += chunk

    def frame(self):
        """(opcode, payload) of the next whole message (servers do not mask)."""
        self._need(2)
        op, ln = self.buf[0] & 0x0F, self.buf[1] & 0x7F
        off = 2
        if ln == 126:
            self._need(4)
            ln, off = struct.unpack(">H", self.buf[2:4])[0], 4
        elif ln == 127:
            self._need(10)
            ln, off = struct.unpack(">Q", self.buf[2:10])[0], 10
        self._need(off + ln)
        payload, self.buf = self.buf[off:off + ln], self.buf[off + ln:]
        return op, payload

    def send(self, op, payload):
        mask = os.urandom(4)
        body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([0x80 | op, 0x80 | len(payload)]) + mask + body)

    def message(self):
        """The next JSON text message, or ('close', code)."""
        while True:
            op, payload = self.frame()
            if op == 1:
                return json.loads(payload)
            if op == 8:
                code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1005
                try:
                    self.send(8, payload[:2])
                except OSError:
                    pass
                return ("close", code)
            if op == 9:
                self.send(10, payload)


def cmd_ws_hold(url, tokens, ready, out, n_pharm, n_cust, seconds):
    paths = [f"/ws/pharmacy/?token={p['access']}" for p in tokens["pharmacies"][:n_pharm]]
    paths += [f"/ws/customer/?token={c['access']}" for c in tokens["customers"][:n_cust]]
    socks = [WS(url, p) for p in paths]
    for s in socks:
        while True:
            m = s.message()
            if isinstance(m, tuple):
                raise SystemExit(f"ws-hold: closed {m[1]} before sync")
            if m.get("type") == "sync":
                break
    open(ready, "w").close()
    deadline = time.monotonic() + seconds

    def wait_close(s):
        s.sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            while True:
                m = s.message()
                if isinstance(m, tuple):
                    return m[1]
        except Exception as e:
            return f"no close frame: {e}"

    with cf.ThreadPoolExecutor(len(socks)) as ex:
        codes = list(ex.map(wait_close, socks))
    json.dump(codes, open(out, "w"))
    print(f"ws-hold: {len(socks)} sockets, close codes {sorted(set(map(str, codes)))}")


def cmd_ws_replay(url, tokens, out, prefix):
    sent, acked = load_log(out, prefix)
    cust = {}
    for k, a in acked.items():
        if a["notified"] > 0:
            cust[a["id"]] = sent[k]
    # The pharmacy notified of most acknowledged requests (all are PENDING: nothing accepts).
    count = {}
    for rid, ci in list(cust.items())[:200]:
        _, raw = call(url, "GET", f"/medicine/request/{rid}/", tokens["customers"][ci]["access"])
        for n in json.loads(raw)["notified"]:
            count.setdefault(n["pharmacy_id"], set()).add(rid)
    if not count:
        print("ws-replay: no acknowledged request had recipients", file=sys.stderr)
        return 1
    pid = max(count, key=lambda p: len(count[p]))
    ph = next(p for p in tokens["pharmacies"] if p["pharmacy_id"] == pid)
    _, raw = call(url, "GET", "/pharmacy/requests/", ph["access"])
    pending = {r["request_id"] if "request_id" in r else r["id"] for r in json.loads(raw)["requests"]}
    s = WS(url, f"/ws/pharmacy/?token={ph['access']}")
    replayed, deadline = set(), time.monotonic() + 10
    while time.monotonic() < deadline:
        m = s.message()
        if isinstance(m, tuple):
            print(f"ws-replay: closed {m[1]} before sync", file=sys.stderr)
            return 1
        if m.get("type") == "new_request" and m.get("replay"):
            replayed.add(m["request_id"])
        if m.get("type") == "sync":
            synced = set(m["pending"])
            break
    else:
        print("ws-replay: no sync within 10 s", file=sys.stderr)
        return 1
    missing = count[pid] - replayed
    ok = not missing and synced == replayed == pending
    print(f"ws-replay: pharmacy {pid}: {len(replayed)} replayed, sync names {len(synced)}, "
          f"/pharmacy/requests/ lists {len(pending)}, {len(missing)} acknowledged requests missing")
    return 0 if ok else 1


def cmd_metric(url, name):
    _, raw = call(url, "GET", "/metrics")
    for line in raw.decode().splitlines():
        if line.startswith(name + " "):
            print(int(float(line.split()[1])))
            return 0
    print(f"metric {name} not found", file=sys.stderr)
    return 1


def main(argv):
    def opt(name, default):
        return type(default)(argv[argv.index(name) + 1]) if name in argv else default

    cmd, url = argv[0], argv[1]
    if cmd == "metric":
        return cmd_metric(url, argv[2])
    tokens = json.load(open(argv[2]))
    if cmd == "post":
        return cmd_post(url, tokens, argv[3], argv[4], opt("--max", 2000), opt("--seconds", 8.0),
                        opt("--threads", 8))
    if cmd == "verify":
        return cmd_verify(url, tokens, argv[3], argv[4], "--repost" in argv)
    if cmd == "ws-hold":
        return cmd_ws_hold(url, tokens, argv[3], argv[4], opt("--pharmacies", 20),
                           opt("--customers", 2), opt("--seconds", 20.0))
    if cmd == "ws-replay":
        return cmd_ws_replay(url, tokens, argv[3], argv[4])
    raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]) or 0)
