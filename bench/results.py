#!/usr/bin/env python3
"""Helpers of bench/results.sh (standard library only).

  results.py startup --server BIN --data-dir DIR --runs N --pharmacies P --open R
      Starts the server on DIR N times; each time measures from spawn to the first `/health` 200
      (polled every 5 ms), then stops it with SIGTERM. Prints JSON. The first run warms the page
      cache; the figure quoted is the median of the others.
  results.py report OUT_DIR
      Reads the sanjevani-load summaries in OUT_DIR and writes results.md (the table) and
      delivery-latency.svg (POST-to-delivery percentiles against request rate).
"""

import argparse
import glob
import http.client
import json
import math
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(port):
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        conn.request("GET", "/health")
        status = conn.getresponse().status
        conn.close()
        return status
    except OSError:
        return None


def startup(args):
    runs = []
    for i in range(args.runs):
        port = free_port()
        env = dict(os.environ, NO_COLOR="1", RUST_LOG="info")
        log = open(os.path.join(args.data_dir + f".startup-{i}.log"), "w")
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [args.server, "serve", "--bind", f"127.0.0.1:{port}", "--data-dir", args.data_dir, "--rate-limits", "off"],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=env,
        )
        seconds = None
        while time.perf_counter() - t0 < 120:
            if health(port) == 200:
                seconds = time.perf_counter() - t0
                break
            if proc.poll() is not None:
                break
            time.sleep(0.005)
        rss_kib = None
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                rss_kib = int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))
        except (OSError, AttributeError):
            pass
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        log.close()
        with open(log.name) as f:
            ready = re.findall(r"ready.*", f.read())
        runs.append({"seconds_to_health_200": seconds, "rss_kib": rss_kib, "exit": code, "ready_log": ready[-1:]})
    warm = [r["seconds_to_health_200"] for r in runs[1:] if r["seconds_to_health_200"] is not None]
    json.dump(
        {
            "pharmacies": args.pharmacies,
            "open_requests": args.open,
            "recipients_each": 50,
            "runs": runs,
            "warm_median_s": statistics.median(warm) if warm else None,
        },
        sys.stdout,
        indent=2,
    )
    print()


def load(path):
    with open(path) as f:
        return json.load(f)


def counters(d):
    c = d["correctness"]
    return sum(v for v in c.values() if isinstance(v, (int, float)))


def p2d(d):
    return d["delivery"]["post_to_delivery"]


def ms(v):
    return "–" if v is None else (f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}")


def report(out):
    rows = []
    main = load(os.path.join(out, "main.json"))
    m = p2d(main)
    c = main["correctness"]
    cfg = main["config"]
    rows.append(
        (
            f"{cfg['sockets']:,} sockets, {cfg['rate']:g} req/s for {cfg['duration_s']:g} s, ~50 recipients, 1 in 5 accepted",
            "p99 POST→delivery ≤ 5 ms; 0 lost, 0 duplicated, 0 double winners",
            f"p50 {ms(m['p50_ms'])} / p99 **{ms(m['p99_ms'])}** / p99.9 {ms(m['p999_ms'])} ms; "
            f"{main['delivery']['live_deliveries']:,} deliveries ({main['delivery']['deliveries_per_s']:,.0f}/s), "
            f"{main['delivery']['frames']:,} frames; lost {c['lost']}, duplicated {c['duplicates']}, "
            f"double winners {c['double_winners']}, after taken {c['after_taken']}; "
            f"{main['requests']['accepted']:,} accepted",
        )
    )
    steps = []
    for path in glob.glob(os.path.join(out, "step-*.json")):
        d = load(path)
        steps.append(
            {
                "rate": d["config"]["rate"],
                "achieved": d["requests"]["achieved_rate"],
                "deliveries_per_s": d["delivery"]["deliveries_per_s"],
                "p50": p2d(d).get("p50_ms"),
                "p99": p2d(d).get("p99_ms"),
                "p999": p2d(d).get("p999_ms"),
                "post_p99": d["http"].get("POST /medicine/request/", {}).get("p99_ms"),
                "lost": d["correctness"]["lost"],
                "bad": counters(d),
                "ok": d["ok"],
                "server_cpu": d["server"]["cpu_s"],
                "generator_cpu": d["generator"]["cpu_s"],
                "seconds": d["requests"]["posting_s"],
            }
        )
    steps.sort(key=lambda s: s["rate"])
    passing = [s for s in steps if s["ok"] and s["bad"] == 0 and s["p99"] is not None and s["p99"] <= 50]
    best = max(passing, key=lambda s: s["rate"]) if passing else None
    rows.append(
        (
            "Highest rate with p99 ≤ 50 ms and nothing lost: 10,000 sockets, ~50 recipients, no accepts (steps below)",
            "≥ 3,000 req/s (150,000 deliveries/s)",
            f"**{best['rate']:,.0f} req/s** ({best['deliveries_per_s']:,.0f} deliveries/s), p99 {ms(best['p99'])} ms"
            if best
            else "no step passed",
        )
    )
    idle = load(os.path.join(out, "idle.json"))
    conn = idle["connections"]
    rows.append(
        (
            f"{conn['sockets']:,} idle authenticated sockets, server RSS delta ÷ N",
            "≤ 10 KiB each",
            f"**{conn['kib_per_socket']:.1f} KiB** per socket "
            f"(RSS {conn['rss_kib_before']:,} → {conn['rss_kib_connected']:,} KiB; {conn['server_fds']:,} server fds)",
        )
    )
    st = load(os.path.join(out, "startup.json"))
    rows.append(
        (
            f"Start-up with {st['pharmacies']:,} pharmacies and {st['open_requests']:,} open requests × 50 recipients "
            "(warm page cache)",
            "≤ 3 s to /health 200",
            f"**{st['warm_median_s']:.2f} s** (median of warm runs: "
            + ", ".join(f"{r['seconds_to_health_200']:.2f}" for r in st["runs"][1:] if r["seconds_to_health_200"])
            + f"; cold first run {st['runs'][0]['seconds_to_health_200']:.2f} s)",
        )
    )
    race = load(os.path.join(out, "race.json"))
    acc = race["http"].get("POST /medicine/response/", {})
    rows.append(
        (
            f"Accept race: {race['requests']['created']:,} rounds × {race['config']['race']} concurrent accepts",
            "0 double winners, p99 per accept ≤ 2 ms",
            f"double winners {race['correctness']['double_winners']}, rounds without a winner "
            f"{race['correctness']['race_no_winner']}; accept p50 {ms(acc.get('p50_ms'))} / p99 **{ms(acc.get('p99_ms'))}** "
            f"/ p99.9 {ms(acc.get('p999_ms'))} ms over {acc.get('count', 0):,} calls",
        )
    )
    lines = ["| Scenario | Target | Measured |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += [
        "",
        "Rate steps (10,000 sockets, ~50 recipients, no accepts; POST-to-delivery in ms):",
        "",
        "| req/s offered | achieved | deliveries/s | p50 | p99 | p99.9 | POST p99 | lost | all counters | server CPU | generator CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in steps:
        lines.append(
            f"| {s['rate']:,.0f} | {s['achieved']:,.0f} | {s['deliveries_per_s']:,.0f} | {ms(s['p50'])} | {ms(s['p99'])} | "
            f"{ms(s['p999'])} | {ms(s['post_p99'])} | {s['lost']} | {s['bad']} | "
            f"{s['server_cpu'] / s['seconds']:.2f} cores | {s['generator_cpu'] / s['seconds']:.2f} cores |"
        )
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "delivery-latency.svg"), "w") as f:
        f.write(plot(steps))
    print("\n".join(lines))


def plot(steps):
    """POST-to-delivery p50/p99/p99.9 (log scale) against offered request rate, as SVG."""
    width, height, left, right, top, bottom = 720, 420, 70, 150, 40, 60
    pw, ph = width - left - right, height - top - bottom
    rates = [s["rate"] for s in steps]
    values = [s[k] for s in steps for k in ("p50", "p99", "p999") if s[k]]
    xmax = max(rates) * 1.05
    lo = 10 ** math.floor(math.log10(max(min(values), 0.1)))
    hi = 10 ** math.ceil(math.log10(max(values + [60])))

    def x(v):
        return left + pw * v / xmax

    def y(v):
        return top + ph * (1 - (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)))

    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="22" font-size="14" font-weight="bold">POST-to-delivery latency vs request rate '
        "(10,000 sockets, ~50 recipients, 2 cores)</text>",
    ]
    decade = lo
    while decade <= hi:
        for k in (1, 2, 5):
            v = decade * k
            if lo <= v <= hi:
                svg.append(f'<line x1="{left}" x2="{left + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#e5e5e5"/>')
                svg.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
        decade *= 10
    step = 500 if xmax <= 5000 else 1000
    for v in range(0, int(xmax) + 1, step):
        svg.append(f'<line x1="{x(v):.1f}" x2="{x(v):.1f}" y1="{top}" y2="{top + ph}" stroke="#f0f0f0"/>')
        svg.append(f'<text x="{x(v):.1f}" y="{top + ph + 18}" text-anchor="middle">{v:,}</text>')
    svg.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
    svg.append(
        f'<text x="{left + pw / 2}" y="{height - 15}" text-anchor="middle">requests/s offered (deliveries/s = 50×)</text>'
    )
    svg.append(
        f'<text transform="translate(18,{top + ph / 2}) rotate(-90)" text-anchor="middle">milliseconds (log scale)</text>'
    )
    for limit, label in ((50, "50 ms"), (5, "5 ms")):
        if lo <= limit <= hi:
            svg.append(
                f'<line x1="{left}" x2="{left + pw}" y1="{y(limit):.1f}" y2="{y(limit):.1f}" stroke="#c00" stroke-dasharray="5,4"/>'
            )
            svg.append(f'<text x="{left + pw + 6}" y="{y(limit) + 4:.1f}" fill="#c00">{label}</text>')
    for key, colour, label in (("p50", "#1f77b4", "p50"), ("p99", "#ff7f0e", "p99"), ("p999", "#2ca02c", "p99.9")):
        pts = [(x(s["rate"]), y(s[key])) for s in steps if s[key]]
        svg.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="'
            + " ".join(f"{a:.1f},{b:.1f}" for a, b in pts)
            + '"/>'
        )
        for a, b in pts:
            svg.append(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{colour}"/>')
        if pts:
            # Labels at the last point, nudged apart when the lines end close together.
            nudge = {"p50": 4, "p99": 14, "p999": -6}[key]
            svg.append(f'<text x="{pts[-1][0] + 8:.1f}" y="{pts[-1][1] + nudge:.1f}" fill="{colour}">{label}</text>')
    # A step with any correctness counter set (at overload: POSTs timed out or skipped).
    for s in steps:
        if s["bad"]:
            word = "lost" if s["lost"] else "errors"
            svg.append(f'<text x="{x(s["rate"]):.1f}" y="{top + 14}" text-anchor="middle" fill="#c00">{word}</text>')
    svg.append("</svg>")
    return "\n".join(svg) + "\n"


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("startup")
    s.add_argument("--server", required=True)
    s.add_argument("--data-dir", required=True)
    s.add_argument("--runs", type=int, default=3)
    s.add_argument("--pharmacies", type=int, required=True)
    s.add_argument("--open", type=int, required=True)
    r = sub.add_parser("report")
    r.add_argument("out")
    args = parser.parse_args()
    if args.cmd == "startup":
        startup(args)
    else:
        report(args.out)


if __name__ == "__main__":
    main()
