#!/usr/bin/env python3
"""Renders bench/results.md from the raw JSON reports and manifests that
bench/compare.sh leaves in bench/raw/.

  render.py --raw DIR --out FILE [--elapsed SECONDS]   whole report
  render.py --one FILE.json                            one-line summary (log)
"""
import argparse
import json
import os
import sys

SCENARIOS = [
    (1, "Scenario 1 — 3-node kvstore (RF 3, W=Quorum) vs 3-member etcd",
     "Same key space, 32 connections each. kvstore round-robin sends each "
     "connection's requests over the 3 nodes in turn; 'via 1 node' sends all "
     "to node 0 (which coordinates). etcd gets all 3 endpoints (connections "
     "spread over them). Read runs start from a prefilled key space."),
    (2, "Scenario 2 — single-node kvstore vs single Redis (appendonly, appendfsync always)",
     "kvstore: one node with no topology file (a one-node cluster). Redis: "
     "`appendonly yes`, `appendfsync always`, `save \"\"`."),
    (3, "Scenario 3 — catch-up of a node that missed the writes",
     "Node 2 is marked Failed (epoch+1) and killed with SIGKILL; distinct keys are "
     "written at quorum through nodes 0 and 1 (they keep hints for node 2); node 2 "
     "is restarted and published Recovering (epoch+1); the time is measured until "
     "its `/v1/cluster` reports `syncedEpoch` >= that epoch (polled every 50 ms; "
     "includes up to 500 ms of the node's topology-file poll)."),
    (4, "Scenario 4 — resident memory at 1 million keys",
     "Keys written through all 3 nodes (RF 3: every node holds every key), then "
     "VmRSS / VmHWM of each kv-node from /proc/PID/status, key count and database "
     "size from /metrics and `du` of the data directory."),
    (5, "Scenario 5 — 50/50 throughput with one node down",
     "kvstore: node 2 marked Failed and killed; clients round-robin over nodes 0 "
     "and 1 (quorum = 2 of 3 owners, so node 0 and 1 both must commit). etcd: "
     "member 2 killed (SIGKILL); clients use members 0 and 1."),
    (6, "Scenario 6 — the cost of TLS: the same 3-node kvstore over https and over http",
     "A 3-node cluster (RF 3, W=R=Quorum) run twice in a row with fresh data, "
     "first plaintext, then with both ports over TLS (rustls, a P-256 "
     "certificate; the peer port mutual TLS), the client trusting the CA "
     "(`kvctl bench --cacert`). 32 connections, round-robin over the nodes; "
     "connections are kept alive, so the cost is mostly per-byte encryption "
     "and the nodes' own TLS calls to their peers. In the ratios below "
     "'kvstore' is the TLS run and 'peer' the plaintext run: ops/s under 1 "
     "is what TLS costs."),
    (7, "Scenario 7 — `kvctl up`'s gateway vs the nodes direct (issue 16: goal 0.9)",
     "One `kvctl up` cluster (3 nodes, Full, Quorum/Quorum) and the same "
     "load three times in a row: through the gateway's address (the Up nodes "
     "share its port, so the kernel spreads connections over them and no "
     "process forwards anything), straight to node 0 (the issue's "
     "comparison: one coordinator), and round-robin over the three nodes' "
     "own ports (the same spread without the gateway: what the gateway "
     "itself costs). In the ratios 'kvstore' is the gateway: 0.9 or more "
     "meets the issue's goal. The server CPU column counts the `kvctl up` "
     "process only (supervisor and control plane), not its node subprocesses.")
]


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def ms(us):
    return f"{us / 1000:.2f}"


def read_manifest(path):
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if line:
                rows.append(line.split("\t"))
    return rows


def error_text(r):
    """The error count with its kinds: every run of compare.sh is fault-free,
    so any error is unexpected and flagged, with the first message of each
    kind (kvctl bench's errorExamples) to explain it."""
    if not r["errors"]:
        return "0"
    kinds = ", ".join(f"{k} {v}" for k, v in r["errorsByKind"].items())
    return f"{r['errors']} ({kinds}) UNEXPECTED"


def summary(r):
    lat = r["latencyUs"]
    line = (f"{r['driver']:8} {r['opsPerSecond']:10.0f} ops/s  p50 {ms(lat['p50'])} ms  "
            f"p99 {ms(lat['p99'])} ms  p999 {ms(lat['p999'])} ms  errors {error_text(r)}")
    for kind, first in r.get("errorExamples", {}).items():
        line += f"\n    first {kind}: {first}"
    return line


def lat_of(r):
    """Latency of the operation the run is about (writes / reads / all)."""
    if r["readRatio"] == 0:
        return r["writeLatencyUs"]
    if r["readRatio"] == 1:
        return r["readLatencyUs"]
    return r["latencyUs"]


def ratio(a, b):
    if not b:
        return "n/a"
    return f"{a / b:.2f}×"


class Report:
    def __init__(self, raw):
        self.raw = raw
        self.runs = {}      # id -> (label, report or None, failure)
        self.order = {}     # scenario -> [ids]
        self.pairs = {}     # scenario -> [(title, kv, peer)]
        self.facts = {}     # scenario -> {name: value}
        self.busy = {}      # id -> (rustc processes, load average) at the start
        self.cpu = {}       # id -> (server CPU s, load generator CPU s, wall s)
        for n, *_ in SCENARIOS:
            self.order[n], self.pairs[n], self.facts[n] = [], [], {}
            for row in read_manifest(os.path.join(raw, f"manifest-s{n}.tsv")):
                if row[0] == "run":
                    rid, label = row[1], row[2]
                    failure = row[4] if len(row) > 4 else None
                    rep = None if failure else load_json(os.path.join(raw, rid + ".json"))
                    if rep is None and not failure:
                        failure = "no report"
                    self.runs[rid] = (label, rep, failure)
                    self.order[n].append(rid)
                elif row[0] == "busy":
                    self.busy[row[1]] = (row[2], row[3])
                elif row[0] == "cpu" and len(row) > 4:
                    try:
                        self.cpu[row[1]] = (float(row[2]), float(row[3]), float(row[4]))
                    except ValueError:
                        pass
                elif row[0] == "pair":
                    self.pairs[n].append((row[1], row[2], row[3]))
                elif row[0] == "fact":
                    self.facts[n][row[1]] = row[2] if len(row) > 2 else ""

    def rep(self, rid):
        return self.runs.get(rid, (None, None, None))[1]

    def has(self, n):
        return bool(self.order[n] or self.facts[n])

    def runs_table(self, n):
        out = ["| run | ops/s | p50 ms | p99 ms | p99.9 ms | max ms | errors | misses | prefill | CPU µs/op server + load gen (cores busy) | other rustc / load |",
               "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|"]
        for rid in self.order[n]:
            label, r, failure = self.runs[rid]
            b = self.busy.get(rid)
            busy = f"{b[0]} / {b[1]}" if b else ""
            if r is None:
                out.append(f"| {label} | FAILED: {failure} | | | | | | | | | {busy} |")
                continue
            lat = lat_of(r)
            pre = ""
            if r.get("prefill"):
                p = r["prefill"]
                rate = p["keys"] / p["seconds"] if p["seconds"] else 0
                pre = (f"{p['keys']} keys in {p['seconds']:.1f} s ({rate:.0f}/s, "
                       f"{r['connections']} connections, {p['errors']} errors)")
            errs = error_text(r)
            if r["seconds"] < 0.5 and r["ops"] <= 1:
                out.append(f"| {label} | (load step) | | | | | {errs} | | {pre} | | {busy} |")
                continue
            out.append(f"| {label} | {r['opsPerSecond']:.0f} | {ms(lat['p50'])} | {ms(lat['p99'])} | "
                       f"{ms(lat['p999'])} | {ms(lat['max'])} | {errs} | {r['misses']} | {pre} | "
                       f"{self.cpu_cell(rid, r)} | {busy} |")
        return out

    def cpu_cell(self, rid, r):
        """CPU per operation of the servers and of the load generator over the
        whole run (warm-up included, at the measured rate), and the cores the
        two kept busy on average."""
        c = self.cpu.get(rid)
        if not c or c[2] <= 0 or r["opsPerSecond"] <= 0:
            return ""
        server, loadgen, wall = c
        ops = r["opsPerSecond"] * wall
        return f"{server / ops * 1e6:.0f} + {loadgen / ops * 1e6:.0f} ({(server + loadgen) / wall:.2f})"

    def pairs_table(self, n):
        if not self.pairs[n]:
            return []
        out = ["| comparison | kvstore ops/s | peer ops/s | ops/s kvstore/peer | kvstore p50 / p99 ms | peer p50 / p99 ms | p99 kvstore/peer |",
               "|---|---:|---:|---:|---:|---:|---:|"]
        for title, a, b in self.pairs[n]:
            ra, rb = self.rep(a), self.rep(b)
            if ra is None or rb is None:
                va = "n/a" if ra is None else "%.0f" % ra["opsPerSecond"]
                vb = "n/a" if rb is None else "%.0f" % rb["opsPerSecond"]
                out.append(f"| {title} | {va} | {vb} | n/a | | | |")
                continue
            la, lb = lat_of(ra), lat_of(rb)
            out.append(f"| {title} | {ra['opsPerSecond']:.0f} | {rb['opsPerSecond']:.0f} | "
                       f"**{ratio(ra['opsPerSecond'], rb['opsPerSecond'])}** | "
                       f"{ms(la['p50'])} / {ms(la['p99'])} | {ms(lb['p50'])} / {ms(lb['p99'])} | "
                       f"{ratio(la['p99'], lb['p99'])} |")
        return out

    def scenario3(self):
        f = self.facts[3]
        out = ["| measure | value |", "|---|---:|"]
        for key, name in [("catchup.seconds", "catch-up time after publishing Recovering (s)"),
                          ("catchup.from_start_seconds", "from process start to synced (s)"),
                          ("catchup.restart_seconds", "process start to /healthz 200 (s)"),
                          ("hints.kv0", "hints pending on node 0 before the restart"),
                          ("hints.kv1", "hints pending on node 1 before the restart"),
                          ("catchup.keys_moved", "resync keysMoved reported by node 2"),
                          ("catchup.keys_node2", "kv_keys on node 2 when synced (gauge, refreshed every 2 s)"),
                          ("catchup.records_node2", "records on node 2 when synced (sum of its /v1/digests counts)"),
                          ("catchup.records_node0", "records on node 0 at that moment (same)")]:
            if key in f:
                out.append(f"| {name} | {f[key]} |")
        return out

    def scenario4(self):
        f = self.facts[4]
        out = ["| node | VmRSS MiB | VmHWM (peak) MiB | kv_keys | kv_db_bytes MiB | data dir (du) MiB |",
               "|---|---:|---:|---:|---:|---:|"]

        def mib_kib(v):
            try:
                return f"{int(v) / 1024:.1f}"
            except (TypeError, ValueError):
                return "n/a"

        def mib_b(v):
            try:
                return f"{float(v) / 1048576:.1f}"
            except (TypeError, ValueError):
                return "n/a"

        for i in range(3):
            if f"rss.kv{i}" not in f:
                continue
            out.append(f"| kv-node {i} | {mib_kib(f[f'rss.kv{i}'])} | {mib_kib(f.get(f'hwm.kv{i}'))} | "
                       f"{f.get(f'keys.kv{i}', 'n/a')} | {mib_b(f.get(f'dbbytes.kv{i}'))} | "
                       f"{mib_kib(f.get(f'du.kv{i}'))} |")
        if "reopen.seconds" in f:
            out += ["", f"Restart of node 2 on this data (process start to `/readyz` 200, bucket digests "
                        f"rebuilt from the records on opening): {f['reopen.seconds']} s."]
        f1 = self.facts[1]
        if "rss100k.kv0" in f1:
            out += ["", f"For comparison, at the end of scenario 1 (key space {f1.get('keys100k.kv0', '?')} keys "
                        "on every node, plus etcd's MVCC history of every write of the scenario):", "",
                    "| process | VmRSS MiB | data dir MiB |", "|---|---:|---:|"]
            for i in range(3):
                out.append(f"| kv-node {i} | {mib_kib(f1.get(f'rss100k.kv{i}'))} | "
                           f"{mib_kib(f1.get('dbsize100k.kv0')) if i == 0 else ''} |")
            for i in range(3):
                out.append(f"| etcd member {i} | {mib_kib(f1.get(f'rss100k.etcd{i}'))} | "
                           f"{mib_kib(f1.get('dbsize100k.etcd0')) if i == 0 else ''} |")
        f2 = self.facts[2]
        if "rss.kv" in f2:
            out += ["", f"End of scenario 2 (its key space written): single kv-node {mib_kib(f2['rss.kv'])} MiB, "
                        f"Redis {mib_kib(f2.get('rss.redis'))} MiB."]
        return out

    def load_note(self):
        busy = [b for b in self.busy.values() if b[0].isdigit()]
        if not busy:
            return [""]
        worst = max(int(b[0]) for b in busy)
        loads = [float(b[1]) for b in busy]
        if worst == 0:
            return [""]
        return [f"**Caveat:** other work shared the machine during these runs: up to {worst} "
                    f"compiler (`rustc`) processes of other engineers, 1-minute load average "
                    f"{min(loads):.1f}–{max(loads):.1f} on {len(loads)} runs (column 'other rustc / load'). "
                    "Every system suffered it alike within a scenario, but absolute figures are "
                    "low and noisy (the single-node write load of scenario 2 gave 1 223, 1 994 and 2 123 writes/s "
                    "in three attempts over the session); rerun on a quiet machine before quoting them.", ""]

    def targets(self):
        rows = []

        def ops(rid):
            r = self.rep(rid)
            return r["opsPerSecond"] if r else None

        def p99(rid):
            r = self.rep(rid)
            return lat_of(r)["p99"] if r else None

        def add(name, value, ok):
            rows.append(f"| {name} | {value} | {'met' if ok else ('**not met**' if ok is not None else 'not measured')} |")

        a, b = ops("s1-w-kv-rr"), ops("s1-w-etcd")
        add("kvstore writes/s ≥ 3× etcd (round-robin)", f"{a / b:.2f}×" if a and b else "n/a",
            (a / b >= 3) if a and b else None)
        a, b = ops("s1-r-kv-q-rr"), ops("s1-r-etcd-lin")
        add("quorum reads/s ≥ 5× etcd linearizable", f"{a / b:.2f}×" if a and b else "n/a",
            (a / b >= 5) if a and b else None)
        a, b = p99("s1-w-kv-rr"), p99("s1-w-etcd")
        add("p99 write latency ≤ etcd's", f"{ms(a)} ms vs {ms(b)} ms" if a and b else "n/a",
            (a <= b) if a and b else None)
        a, b = ops("s2-w-kv"), ops("s2-w-redis")
        add("single-node writes ≥ 1.0× Redis (appendfsync always)", f"{a / b:.2f}×" if a and b else "n/a",
            (a / b >= 1.0) if a and b else None)
        a, b = ops("s2-r-kv"), ops("s2-r-redis")
        add("single-node reads ≥ 0.8× Redis", f"{a / b:.2f}×" if a and b else "n/a",
            (a / b >= 0.8) if a and b else None)
        c = self.facts[3].get("catchup.seconds")
        add("catch-up of 100 000 missed writes ≤ 5 s", f"{c} s" if c else "n/a",
            (float(c) <= 5) if c else None)
        rss = [int(self.facts[4][f"rss.kv{i}"]) for i in range(3) if self.facts[4].get(f"rss.kv{i}", "").isdigit()]
        add("≤ 150 MiB RSS per node at 1 million keys",
            (" / ".join(f"{x / 1024:.0f}" for x in rss) + " MiB") if rss else "n/a",
            (max(rss) <= 150 * 1024) if rss else None)
        return ["| target | measured | verdict |", "|---|---|---|"] + rows

    def render(self, elapsed):
        m = {}
        for row in read_manifest(os.path.join(self.raw, "machine.tsv")):
            m[row[0]] = row[1] if len(row) > 1 else ""
        out = ["# kvstore vs etcd vs Redis — benchmark results", "",
               f"Produced by `bash bench/compare.sh` (see `bench/README.md`); last invocation {m.get('date', '?')}"
               + (f" ({elapsed} s)" if elapsed else "")
               + "; each scenario says when it ran. Every figure comes from the same load generator, `kvctl bench` "
                 "(HDR histograms; latency is per operation as the client sees it).", "",
               "## Machine and versions", "", "| | |", "|---|---|"]
        for k in ["cpu", "nproc", "memory", "kernel", "disk", "fsync", "kvstore", "binaries", "etcd", "redis", "params"]:
            if k in m:
                out.append(f"| {k} | {m[k]} |")
        out += ["", "Everything runs on this one machine over loopback: clients, every node and "
                    "member, so the load generator competes with the servers for the 2 cores. "
                    "etcd: default durability (fsync of its WAL per commit batch). Redis: one instance, "
                    "`appendfsync always`. kvstore: SQLite, fsync'd group commit.", "",
                ] + self.load_note() + ["## Targets", ""] + self.targets()
        for n, title, text in SCENARIOS:
            if not self.has(n):
                continue
            when = ""
            if "started" in self.facts[n]:
                when = f" Run {self.facts[n]['started']}, {self.facts[n].get('seconds', '?')} s."
            out += ["", f"## {title}", "", text + when, ""]
            if n == 3:
                out += self.runs_table(n) + [""] + self.scenario3()
            elif n == 4:
                out += self.runs_table(n) + [""] + self.scenario4()
            else:
                out += self.runs_table(n)
            pt = self.pairs_table(n)
            if pt:
                out += ["", "Ratios (kvstore / peer; ops/s above 1 and p99 below 1 favour kvstore):", ""] + pt
        out += ["", "Latency columns are the latency of the run's operation: writes for write-only "
                    "runs, reads for read-only runs, every operation for 50/50 runs. Errors are "
                    "operations that failed (timeouts, 5xx); misses are reads of absent keys. "
                    "'other rustc / load': compiler processes of other work on the machine and the "
                    "1-minute load average when the run started (0 rustc = a quiet machine). "
                    "'CPU µs/op': CPU time of the system's server processes and of the load generator "
                    "(kvctl bench) per operation, over the run including its warm-up, with the "
                    "cores both kept busy on average (2.00 = the whole machine). "
                    "Raw reports: `bench/raw/*.json`."]
        prof = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profile.md")
        if os.path.exists(prof):
            with open(prof) as f:
                out += ["", f.read().rstrip()]
        return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--one")
    ap.add_argument("--raw")
    ap.add_argument("--out")
    ap.add_argument("--elapsed")
    a = ap.parse_args()
    if a.one:
        r = load_json(a.one)
        if r is None:
            sys.exit(f"cannot read {a.one}")
        print("    " + summary(r))
        return
    if not a.raw or not a.out:
        ap.error("--raw and --out are required")
    text = Report(a.raw).render(a.elapsed)
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, a.out)


if __name__ == "__main__":
    main()
