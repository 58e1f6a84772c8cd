#!/usr/bin/env python3
"""Turns the raw output of scripts/bench.sh into figures, a table and JSON.

    report.py summary RESULTS_DIR SYSTEM   one line per system (progress)
    report.py report  RESULTS_DIR OUT.json the table, the comparison, the JSON

RESULTS_DIR holds meta.txt ("key value" lines) and one directory per system
with tcp1.json, tcp4.json, udp.json (iperf3 -J), ping.txt (ping's output),
facts.txt ("key value": CPU ticks, RSS in kB, ...) and errors.txt.
Units: bit/s, packets/s, ms, CPU seconds per GB (1e9 bytes), MB (1e6 bytes).
"""
import json
import math
import os
import re
import sys
import time

SYSTEMS = ["veth", "pilot-tun", "wireguard-go"]
LABEL = {"veth": "raw veth", "pilot-tun": "pilot-tun", "wireguard-go": "wireguard-go"}
# TCP only, with the veth at MTU 1460 (Google Cloud's default).
SYSTEMS_1460 = ["pilot-tun@1460", "wireguard-go@1460", "wireguard-go@1460-mtu1420"]
LABEL.update({
    "pilot-tun@1460": "pilot-tun (no flag)",
    "wireguard-go@1460": "wireguard-go, MTU 1380",
    "wireguard-go@1460-mtu1420": "wireguard-go, MTU 1420",
})
# TCP 1 stream with a share of the underlay packets dropped at random.
SYSTEMS_LOSS = ["veth@loss", "pilot-tun@loss", "wireguard-go@loss"]
LABEL.update({s: LABEL[s.split("@")[0]] for s in SYSTEMS_LOSS})


def read_kv(path):
    out = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                k, _, v = line.partition(" ")
                out[k] = v
    return out


def load_iperf(path, errors, name):
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        errors.append(f"{name}: cannot parse iperf3 JSON: {e}")
        return None
    if d.get("error"):
        errors.append(f"{name}: iperf3: {d['error']}")
    return d


def tcp_figures(d):
    try:
        r = d["end"]["sum_received"]
        s = d["end"]["sum_sent"]
    except (KeyError, TypeError):
        return {}
    return {
        "bps": r["bits_per_second"],
        "bytes": r["bytes"],
        "seconds": r["seconds"],
        "retransmits": s.get("retransmits"),
    }


def udp_figures(d):
    try:
        r = d["end"]["sum_received"]
        s = d["end"]["sum_sent"]
    except (KeyError, TypeError):
        return {}
    secs = r["seconds"] or float("nan")
    got = r["packets"] - r["lost_packets"]
    return {
        "pps": got / secs,
        "sent_pps": s["packets"] / (s["seconds"] or float("nan")),
        "loss_pct": r["lost_percent"],
        "packets_received": got,
        "packets_sent": s["packets"],
    }


def ping_figures(path):
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        text = f.read()
    rtts = [float(x) for x in re.findall(r"time=([0-9.]+) ms", text)]
    m = re.search(r"(\d+) packets transmitted, (\d+) received", text)
    sent = int(m.group(1)) if m else None
    if not rtts:
        return {"sent": sent, "received": 0}
    srt = sorted(rtts)
    # p99 by nearest rank: the smallest RTT that at least 99% of samples do not exceed
    p99 = srt[max(0, math.ceil(0.99 * len(srt)) - 1)]
    return {
        "avg_ms": sum(rtts) / len(rtts),
        "p50_ms": srt[(len(srt) - 1) // 2],
        "p99_ms": p99,
        "min_ms": srt[0],
        "max_ms": srt[-1],
        "sent": sent,
        "received": len(rtts),
        "loss_pct": (100.0 * (sent - len(rtts)) / sent) if sent else None,
    }


def system_figures(res, sysname, meta):
    d = os.path.join(res, sysname)
    errors = []
    if os.path.exists(os.path.join(d, "errors.txt")):
        with open(os.path.join(d, "errors.txt")) as f:
            errors += [l.strip() for l in f if l.strip()]
    facts = read_kv(os.path.join(d, "facts.txt"))
    clk = float(meta.get("clk_tck", "100"))
    fig = {"present": os.path.isdir(d)}
    tcp1 = tcp_figures(load_iperf(os.path.join(d, "tcp1.json"), errors, "tcp1"))
    tcp4 = tcp_figures(load_iperf(os.path.join(d, "tcp4.json"), errors, "tcp4"))
    udp = udp_figures(load_iperf(os.path.join(d, "udp.json"), errors, "udp"))
    ping = ping_figures(os.path.join(d, "ping.txt"))
    fig["tcp1_bps"] = tcp1.get("bps")
    fig["tcp1_bytes"] = tcp1.get("bytes")
    fig["tcp1_retransmits"] = tcp1.get("retransmits")
    fig["tcp4_bps"] = tcp4.get("bps")
    fig["tcp4_bytes"] = tcp4.get("bytes")
    fig["tcp4_retransmits"] = tcp4.get("retransmits")
    fig["udp_pps"] = udp.get("pps")
    fig["udp_sent_pps"] = udp.get("sent_pps")
    fig["udp_loss_pct"] = udp.get("loss_pct")
    fig["ping_avg_ms"] = ping.get("avg_ms")
    fig["ping_p50_ms"] = ping.get("p50_ms")
    fig["ping_p99_ms"] = ping.get("p99_ms")
    fig["ping_min_ms"] = ping.get("min_ms")
    fig["ping_max_ms"] = ping.get("max_ms")
    fig["ping_loss_pct"] = ping.get("loss_pct")
    # daemon CPU (both ends) per GB the receiver got, per test
    for test, figs in (("tcp1", tcp1), ("tcp4", tcp4)):
        ticks = facts.get(f"cpu_ticks_{test}")
        if ticks is not None and figs.get("bytes"):
            secs = int(ticks) / clk
            fig[f"cpu_s_{test}"] = secs
            fig[f"cpu_s_per_gb_{test}"] = secs / (figs["bytes"] / 1e9)
        else:
            fig[f"cpu_s_{test}"] = None
            fig[f"cpu_s_per_gb_{test}"] = None
    if facts.get("cpu_ticks_udp") is not None:
        fig["cpu_s_udp"] = int(facts["cpu_ticks_udp"]) / clk
    fig["cpu_s_per_gb"] = fig["cpu_s_per_gb_tcp1"]
    for k in ("rss_idle_kb_a", "rss_idle_kb_b", "rss_peak_kb_a", "rss_peak_kb_b",
              "rss_after_kb_a", "rss_after_kb_b"):
        fig[k] = int(facts[k]) if facts.get(k, "").isdigit() else None
    idle = [v for v in (fig["rss_idle_kb_a"], fig["rss_idle_kb_b"]) if v is not None]
    peak = [v for v in (fig["rss_peak_kb_a"], fig["rss_peak_kb_b"]) if v is not None]
    # the larger of the two daemons (each has exactly one peer), in MB (1e6 B)
    fig["rss_idle_mb"] = max(idle) * 1024 / 1e6 if idle else None
    fig["rss_peak_mb"] = max(peak) * 1024 / 1e6 if peak else None
    # underlay packets the loss rule saw and dropped (both ends)
    seen, dropped = facts.get("loss_seen"), facts.get("loss_dropped")
    if seen is not None and dropped is not None:
        fig["underlay_packets"] = int(seen)
        fig["underlay_dropped"] = int(dropped)
        fig["underlay_loss_pct"] = 100.0 * int(dropped) / int(seen) if int(seen) else None
    for k in ("endpoint", "mtu", "pid_a", "pid_b"):
        if k in facts:
            fig[k] = facts[k]
    # the daemon's own view after the load (pilot-tun: drop counters, bytes, path)
    for name in ("status-a", "status-b", "peers-after"):
        p = os.path.join(res, f"{sysname}-{name}.json")
        if os.path.exists(p):
            try:
                with open(p) as f:
                    fig.setdefault("daemon", {})[name] = json.load(f)
            except ValueError:
                pass
    fig["errors"] = errors
    return fig


# metric key, column title, formatter, higher_is_better
METRICS = [
    ("tcp1_bps", "TCP 1 stream", lambda v: f"{v / 1e9:.2f} Gbit/s", True),
    ("tcp4_bps", "TCP 4 streams", lambda v: f"{v / 1e9:.2f} Gbit/s", True),
    ("udp_pps", f"UDP pps", lambda v: f"{v / 1e3:.0f} kpps", True),
    ("ping_avg_ms", "ping avg", lambda v: f"{v * 1000:.0f} us", False),
    ("ping_p99_ms", "ping p99", lambda v: f"{v * 1000:.0f} us", False),
    ("cpu_s_per_gb", "CPU s/GB", lambda v: f"{v:.2f} s/GB", False),
    ("rss_idle_mb", "RSS idle/peak", None, False),
]


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt_ratio(r):
    return "n/a" if r is None else f"{r:.2f}x"


def rss_cell(f):
    i, p = f.get("rss_idle_mb"), f.get("rss_peak_mb")
    if i is None and p is None:
        return "n/a"
    s = lambda v: "?" if v is None else f"{v:.1f}"
    return f"{s(i)} / {s(p)} MB"


def table(figs, meta):
    cols = ["system"] + [m[1] for m in METRICS]
    rows = []
    base = figs.get("veth", {})
    for sysname in SYSTEMS:
        f = figs.get(sysname)
        if f is None:
            continue
        vals, rats = [LABEL[sysname]], ["  ÷ raw veth"]
        for key, _, fmt, _ in METRICS:
            v = f.get(key)
            if key == "rss_idle_mb":
                vals.append(rss_cell(f))
                rats.append("")
                continue
            vals.append("n/a" if v is None else fmt(v))
            if sysname == "veth":
                rats.append("")
            else:
                r = ratio(v, base.get(key))
                rats.append("" if r is None else fmt_ratio(r))
        rows.append(vals)
        if sysname != "veth":
            rows.append(rats)
    widths = [max(len(str(r[i])) for r in rows + [cols]) for i in range(len(cols))]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths)))
    out = [line(cols), "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append(line(r))
    return "\n".join(out)


def table_1460(figs):
    """TCP at underlay MTU 1460, and pilot-tun ÷ wireguard-go (MTU 1380)."""
    rows = [("system", "MTU", "TCP 1 stream", "TCP 4 streams", "CPU s/GB")]
    for s in SYSTEMS_1460:
        f = figs.get(s)
        if f is None:
            continue
        g = lambda k: "n/a" if f.get(k) is None else f"{f[k] / 1e9:.2f} Gbit/s"
        c = "n/a" if f.get("cpu_s_per_gb") is None else f"{f['cpu_s_per_gb']:.2f}"
        rows.append((LABEL[s], f.get("mtu", "?"), g("tcp1_bps"), g("tcp4_bps"), c))
    pt, wg = figs.get("pilot-tun@1460", {}), figs.get("wireguard-go@1460", {})
    r1, r4 = ratio(pt.get("tcp1_bps"), wg.get("tcp1_bps")), ratio(pt.get("tcp4_bps"), wg.get("tcp4_bps"))
    rows.append(("pilot-tun ÷ wireguard-go 1380", "", fmt_ratio(r1), fmt_ratio(r4), ""))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, r in enumerate(rows):
        out.append("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out), {"tcp1_ratio": r1, "tcp4_ratio": r4}


def table_loss(figs, pct):
    """TCP 1 stream under underlay loss, and pilot-tun ÷ wireguard-go."""
    rows = [("system", "TCP 1 stream", "retransmits", "underlay loss", "CPU s/GB")]
    for s in SYSTEMS_LOSS:
        f = figs.get(s)
        if f is None:
            continue
        t = "n/a" if f.get("tcp1_bps") is None else f"{f['tcp1_bps'] / 1e6:.0f} Mbit/s"
        r = "n/a" if f.get("tcp1_retransmits") is None else str(f["tcp1_retransmits"])
        lo = "n/a" if f.get("underlay_loss_pct") is None else \
            f"{f['underlay_loss_pct']:.2f}% of {f['underlay_packets']}"
        c = "n/a" if f.get("cpu_s_per_gb") is None else f"{f['cpu_s_per_gb']:.2f}"
        rows.append((LABEL[s], t, r, lo, c))
    pt, wg = figs.get("pilot-tun@loss", {}), figs.get("wireguard-go@loss", {})
    r1 = ratio(pt.get("tcp1_bps"), wg.get("tcp1_bps"))
    ok = None if r1 is None else r1 >= 1
    res = "n/a" if ok is None else ("pass" if ok else "MISS")
    rows.append(("pilot-tun ÷ wireguard-go", fmt_ratio(r1), "", "", f"target >= 1x: {res}"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, r in enumerate(rows):
        out.append("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out), {"loss_pct": pct, "tcp1_ratio": r1, "target": ">= 1x", "pass": ok}


def comparison(figs):
    """pilot-tun against wireguard-go (and, for some targets, raw veth) in
    this run, with the targets of issue 14 (throughput round two)."""
    pt, wg, veth = figs.get("pilot-tun", {}), figs.get("wireguard-go", {}), figs.get("veth", {})
    items = []

    def ratio_item(name, key, target_text, test, other=wg, vs="wireguard-go"):
        r = ratio(pt.get(key), other.get(key))
        ok = None if r is None or test is None else bool(test(r))
        items.append({"name": name, "metric": key, "ratio": r, "vs": vs,
                      "pilot_tun": pt.get(key), "other": other.get(key),
                      "target": target_text, "pass": ok})

    ratio_item("TCP 1 stream", "tcp1_bps", ">= 8x", lambda r: r >= 8)
    ratio_item("TCP 4 streams", "tcp4_bps", None, None)
    ratio_item("ping RTT avg", "ping_avg_ms", "< 1x (lower)", lambda r: r < 1)
    ratio_item("ping RTT p99", "ping_p99_ms", None, None)
    ratio_item("UDP 64 B pps", "udp_pps", ">= 5x", lambda r: r >= 5)
    ratio_item("CPU s/GB (1 stream)", "cpu_s_per_gb", "<= 0.2x", lambda r: r <= 0.2)
    ratio_item("CPU s/GB (4 streams)", "cpu_s_per_gb_tcp4", None, None)
    ratio_item("RSS peak after load", "rss_peak_mb", None, None)
    ratio_item("TCP 1 stream", "tcp1_bps", ">= 0.25x", lambda r: r >= 0.25, veth, "raw veth")
    ratio_item("TCP 4 streams", "tcp4_bps", ">= 0.30x", lambda r: r >= 0.30, veth, "raw veth")
    ratio_item("ping RTT avg", "ping_avg_ms", "<= 3x (lower)", lambda r: r <= 3, veth, "raw veth")
    rss = pt.get("rss_idle_mb")
    items.append({"name": "RSS idle, one peer", "metric": "rss_idle_mb", "vs": None,
                  "ratio": None, "pilot_tun": rss, "other": None,
                  "absolute": True, "target": "< 20 MB",
                  "pass": None if rss is None else rss < 20})
    return items


def comparison_text(items):
    out = ["pilot-tun ÷ other             vs            pilot-tun        other   ratio  target         result",
           "----------------------------  ------------  -----------  -----------  -------  -------------  ------"]
    fmts = {m[0]: m[2] for m in METRICS}
    fmts["rss_idle_mb"] = fmts["rss_peak_mb"] = lambda v: f"{v:.1f} MB"
    fmts["cpu_s_per_gb_tcp4"] = fmts["cpu_s_per_gb"]
    for it in items:
        f = fmts.get(it["metric"], lambda v: f"{v:.3g}")
        a = "n/a" if it["pilot_tun"] is None else f(it["pilot_tun"])
        b = "" if it.get("absolute") else ("n/a" if it["other"] is None else f(it["other"]))
        r = "" if it.get("absolute") else fmt_ratio(it["ratio"])
        tgt = it["target"] or "-"
        res = "" if it["target"] is None else ("n/a" if it["pass"] is None else ("pass" if it["pass"] else "MISS"))
        out.append(f"{it['name']:<28}  {it['vs'] or '':<12}  {a:>11}  {b:>11}  {r:>7}  {tgt:<13}  {res}")
    return "\n".join(out)


def summary(res, sysname):
    meta = read_kv(os.path.join(res, "meta.txt"))
    f = system_figures(res, sysname, meta)
    parts = []
    for key, title, fmt, _ in METRICS:
        if key == "rss_idle_mb":
            parts.append(f"RSS {rss_cell(f)}")
        elif f.get(key) is not None:
            parts.append(f"{title} {fmt(f[key])}")
    if f.get("udp_loss_pct") is not None:
        parts.append(f"UDP loss {f['udp_loss_pct']:.1f}%")
    if f.get("underlay_loss_pct") is not None:
        parts.append(f"underlay packets dropped {f['underlay_dropped']} of {f['underlay_packets']} "
                     f"({f['underlay_loss_pct']:.2f}%)")
    print(f"[bench] {sysname}: " + ", ".join(parts))
    for e in f["errors"]:
        print(f"[bench] {sysname}: error: {e}")


def num(v):
    return v if not isinstance(v, float) or math.isfinite(v) else None


def clean(o):
    if isinstance(o, dict):
        return {k: clean(v) for k, v in o.items()}
    if isinstance(o, list):
        return [clean(v) for v in o]
    return num(o)


def report(res, out_path):
    meta = read_kv(os.path.join(res, "meta.txt"))
    figs = {s: system_figures(res, s, meta) for s in SYSTEMS if os.path.isdir(os.path.join(res, s))}
    figs_1460 = {s: system_figures(res, s, meta) for s in SYSTEMS_1460
                 if os.path.isdir(os.path.join(res, s))}
    figs_loss = {s: system_figures(res, s, meta) for s in SYSTEMS_LOSS
                 if os.path.isdir(os.path.join(res, s))}
    print()
    print(f"pilot-tun benchmark: {meta.get('seconds')} s per iperf3 test, {meta.get('pings')} pings at 10 ms, "
          f"UDP datagrams of {meta.get('udp_len')} B; {meta.get('cpus')} CPUs ({meta.get('cpu_model')}), "
          f"kernel {meta.get('kernel')}")
    print(f"pilot-tun {meta.get('pilot_tun')} ({meta.get('git')}); {meta.get('wireguard_go')}; {meta.get('iperf3')}; "
          f"load average {meta.get('loadavg_start', '?')} at the start, {meta.get('loadavg_end', '?')} at the end")
    print("TCP: receiver bitrate. UDP: datagrams/s that arrived. CPU: daemons at both ends, "
          "user+system seconds per GB (1e9 B) received in the 1-stream test. "
          "RSS: larger of the two daemons, idle with one peer / peak (VmHWM) after load; MB = 1e6 B.")
    print()
    print(table(figs, meta))
    extra = []
    for s, f in figs.items():
        if f.get("udp_loss_pct") is not None:
            extra.append(f"{LABEL[s]} UDP loss {f['udp_loss_pct']:.1f}% (sent {f['udp_sent_pps'] / 1e3:.0f} kpps)")
    if extra:
        print("  " + "; ".join(extra))
    print("  (UDP: one iperf3 sender at full speed; on raw veth its send() also runs the receiving side's\n"
          "   kernel path on the same core, so raw veth can deliver fewer datagrams/s than a tunnel that queues them.)")
    print()
    items = comparison(figs)
    print(comparison_text(items))
    targets = [it for it in items if it["target"]]
    npass = sum(1 for it in targets if it["pass"])
    print(f"targets: {npass} of {len(targets)} met (figures are informational; the benchmark does not fail on them)")
    ratios_1460 = None
    if figs_1460:
        print()
        print("Underlay MTU 1460 (the veth at 1460 on both ends; TCP receiver bitrate):")
        text, ratios_1460 = table_1460(figs_1460)
        print(text)
    ratios_loss = None
    if figs_loss:
        print()
        print(f"Underlay loss: {meta.get('loss_pct', '?')}% of the packets arriving on either veth end dropped at "
              "random (nftables numgen), segmentation offloads off on the veth; TCP receiver bitrate:")
        text, ratios_loss = table_loss(figs_loss, meta.get("loss_pct"))
        print(text)
    errs = [(s, e) for s, f in list(figs.items()) + list(figs_1460.items()) + list(figs_loss.items())
            for e in f["errors"]]
    if errs:
        print()
        for s, e in errs:
            print(f"error during {LABEL[s]}: {e}")
    ratios_veth = {}
    for s in SYSTEMS:
        if s == "veth" or s not in figs:
            continue
        ratios_veth[s] = {k: ratio(figs[s].get(k), figs.get("veth", {}).get(k))
                          for k, _, _, _ in METRICS if k not in ("cpu_s_per_gb", "rss_idle_mb")}
    doc = {
        "schema": "pilot-tun-bench/2",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "meta": meta,
        "units": {"bps": "bit/s (receiver)", "pps": "datagrams/s received", "ms": "milliseconds",
                  "cpu_s_per_gb": "daemon user+system CPU seconds, both ends, per 1e9 bytes received",
                  "mb": "1e6 bytes", "kb": "KiB as in /proc/PID/status"},
        "systems": figs,
        "underlay_mtu_1460": {"systems": figs_1460, "pilot_tun_vs_wireguard_go_1380": ratios_1460},
        "underlay_loss": {"systems": figs_loss, "pilot_tun_vs_wireguard_go": ratios_loss},
        "ratio_to_veth": ratios_veth,
        "pilot_tun_vs_wireguard_go": items,
        "targets_met": npass,
        "targets_total": len(targets),
    }
    with open(out_path + ".tmp", "w") as f:
        json.dump(clean(doc), f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(out_path + ".tmp", out_path)


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "summary":
        summary(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 4 and sys.argv[1] == "report":
        report(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
