#!/usr/bin/env python3
"""Summaries for scripts/kafka-upper-bound (issue #17 item 5).

`scripts/kafka-upper-bound` starts the processes; this file only reads what
Kafka's ProducerPerformance printed and does the arithmetic.

    kafka_upper_bound.py parse LOG [SNAP_BEFORE SNAP_AFTER]
        prints the run's final summary as one TSV line:
        records  rec_per_s  mb_per_s  avg_ms  max_ms  p50_ms  p95_ms  p99_ms  p999_ms
        busy_pct  producer_cpu  kafka_cpu  others_cpu
        (exit 1 if the log has no final summary line). The snapshots, taken
        by scripts/kafka-upper-bound just before the producer starts and just
        after it exits, hold: the "cpu" line of /proc/stat, "kafka TICKS"
        (utime+stime of the local Kafka JVM, or "-"), "host CLK_TCK NCPU", and
        bash's `times` (last line: its children's user and system time, i.e.
        the producer JVM's). busy_pct is the whole machine's busy share; the
        CPU figures are % of one core; others = what neither used (this box
        is shared). "-" where a figure is unknown.

    kafka_upper_bound.py summary RUNS.tsv [--tsv-out FILE]
        RUNS.tsv has one line per run: setting  run  <the 13 fields above>.
        Prints a table of the runs and, per setting, the median of each
        column; --tsv-out writes the medians as
        setting  runs  rec_per_s  mb_per_s  avg_ms  p50_ms  p99_ms  busy_pct
        producer_cpu  kafka_cpu  others_cpu   (scripts/bench reads that file).

    kafka_upper_bound.py wait-idle MAX_S [BUSY_PCT]
        waits until the machine was at most BUSY_PCT (15) % busy for 3
        consecutive seconds, at most MAX_S seconds; prints how long it waited
        and exits 0, or 1 when it timed out (the box is shared: a build
        starting mid-run halves the figures).

ProducerPerformance's final line looks like
    1000000 records sent, 123456.7 records/sec (58.87 MB/sec), 250.12 ms avg
    latency, 800.00 ms max latency, 200 ms 50th, 500 ms 95th, 700 ms 99th,
    750 ms 99.9th.
Its "MB/sec" is bytes / 2^20 per second (MiB/s); it is kept as printed.
"""

import re
import statistics
import sys
import time

FINAL = re.compile(
    r"(?P<records>\d+) records sent, (?P<rate>[\d.]+) records/sec \((?P<mb>[\d.]+) MB/sec\), "
    r"(?P<avg>[\d.]+) ms avg latency, (?P<max>[\d.]+) ms max latency, "
    r"(?P<p50>[\d.]+) ms 50th, (?P<p95>[\d.]+) ms 95th, (?P<p99>[\d.]+) ms 99th, "
    r"(?P<p999>[\d.]+) ms 99.9th"
)
FIELDS = ["records", "rate", "mb", "avg", "max", "p50", "p95", "p99", "p999"]
CPU_FIELDS = ["busy", "producer", "kafka", "others"]


def read_snapshot(path):
    snap = {}
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for line in lines:
        w = line.split()
        if not w:
            continue
        if w[0] == "cpu":
            v = [int(x) for x in w[1:9]]  # user nice system idle iowait irq softirq steal
            snap["idle"] = v[3] + v[4]
            snap["busy"] = sum(v) - snap["idle"]
        elif w[0] == "kafka":
            snap["kafka"] = int(w[1]) if w[1].isdigit() else None
        elif w[0] == "host":
            snap["clk_tck"], snap["ncpu"] = int(w[1]), int(w[2])
    # bash `times`: "0m1.234s 0m0.567s" lines, the last one for its children.
    times = [ln for ln in lines if re.fullmatch(r"\d+m[\d.]+s \d+m[\d.]+s", ln.strip())]
    if times:
        secs = 0.0
        for t in times[-1].split():
            m, sec = re.fullmatch(r"(\d+)m([\d.]+)s", t).groups()
            secs += 60 * int(m) + float(sec)
        snap["children_s"] = secs
    return snap


def cpu_figures(before, after):
    """busy %, producer / Kafka / others' CPU in % of one core, as strings."""
    a, b = read_snapshot(before), read_snapshot(after)
    busy = b["busy"] - a["busy"]
    total = busy + b["idle"] - a["idle"]
    if total <= 0 or "clk_tck" not in a:
        return ["-"] * 4
    ncpu, hz = a["ncpu"], a["clk_tck"]
    wall = total / ncpu / hz
    busy_pct = 100.0 * busy / total
    producer = 100.0 * (b["children_s"] - a["children_s"]) / wall if "children_s" in a and "children_s" in b else None
    kafka = None
    if a.get("kafka") is not None and b.get("kafka") is not None:
        kafka = 100.0 * (b["kafka"] - a["kafka"]) / hz / wall
    others = None
    if producer is not None and kafka is not None:
        others = max(0.0, busy_pct * ncpu - producer - kafka)
    return [f"{x:.1f}" if x is not None else "-" for x in (busy_pct, producer, kafka, others)]


def parse(path, stat_before=None, stat_after=None):
    last = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = FINAL.search(line)
            if m:
                last = m  # with --warmup-records the steady-state line comes last
    if last is None:
        print(f"kafka_upper_bound: no ProducerPerformance summary in {path}", file=sys.stderr)
        return 1
    cpu = cpu_figures(stat_before, stat_after) if stat_before and stat_after else ["-"] * 4
    print("\t".join([last.group(k) for k in FIELDS] + cpu))
    return 0


def fmt_int(x):
    return f"{x:,.0f}"


def fmt_ms(x):
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"


def fmt_cpu(x):
    return "-" if x is None else f"{x:.0f}"


def read_runs(path):
    """setting -> list of runs (dicts), in file order."""
    runs = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 2 + len(FIELDS) + len(CPU_FIELDS):
                continue
            row = dict(zip(FIELDS, map(float, parts[2 : 2 + len(FIELDS)])))
            for k, v in zip(CPU_FIELDS, parts[2 + len(FIELDS) :]):
                row[k] = None if v == "-" else float(v)
            row["run"] = parts[1]
            runs.setdefault(parts[0], []).append(row)
    return runs


def medians(rows):
    med = {k: statistics.median(r[k] for r in rows) for k in FIELDS}
    for k in CPU_FIELDS:
        v = [r[k] for r in rows if r[k] is not None]
        med[k] = statistics.median(v) if v else None
    return med


def table_row(setting, run, records, r, bold=False):
    b = "**" if bold else ""
    return (
        f"| {b}{setting}{b} | {b}{run}{b} | {records} | {b}{fmt_int(r['rate'])}{b} | {b}{r['mb']:.2f}{b} | "
        f"{fmt_ms(r['avg'])} / {fmt_ms(r['p50'])} / {fmt_ms(r['p99'])} | {fmt_ms(r['max'])} | "
        f"{fmt_cpu(r['busy'])} | {fmt_cpu(r['producer'])} / {fmt_cpu(r['kafka'])} / {fmt_cpu(r['others'])} |"
    )


def summary(path, tsv_out=None):
    runs = read_runs(path)
    if not runs:
        print("kafka_upper_bound: no completed runs", file=sys.stderr)
        return 1
    print(
        "| producer settings | run | records | records/s | MB/s | latency avg / p50 / p99 ms | max ms "
        "| machine busy % | CPU % of a core: producer / Kafka / others |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    out = []
    for setting, rows in runs.items():
        for r in rows:
            print(table_row(setting, r["run"], fmt_int(r["records"]), r))
        med = medians(rows)
        print(table_row(setting, f"median of {len(rows)}", "", med, bold=True))
        out.append(
            [setting, str(len(rows))]
            + [f"{med[k]:.2f}" for k in ("rate", "mb", "avg", "p50", "p99")]
            + [fmt_cpu(med[k]) for k in CPU_FIELDS]
        )
    if tsv_out:
        with open(tsv_out, "w", encoding="utf-8") as f:
            for fields in out:
                f.write("\t".join(fields) + "\n")
    return 0


def cpu_now():
    with open("/proc/stat", encoding="utf-8") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    idle = v[3] + v[4]
    return sum(v) - idle, idle


def wait_idle(max_s, busy_pct=15.0, need=3):
    start = time.monotonic()
    ok = 0
    b0, i0 = cpu_now()
    while True:
        time.sleep(1)
        b1, i1 = cpu_now()
        total = (b1 - b0) + (i1 - i0)
        pct = 100.0 * (b1 - b0) / total if total > 0 else 0.0
        b0, i0 = b1, i1
        ok = ok + 1 if pct <= busy_pct else 0
        waited = time.monotonic() - start
        if ok >= need:
            print(f"{waited:.0f}")
            return 0
        if waited >= max_s:
            print(f"{waited:.0f}")
            return 1


def usage():
    print(__doc__, file=sys.stderr)
    return 2


def main(argv):
    if len(argv) in (2, 4) and argv[0] == "parse":
        return parse(*argv[1:])
    if len(argv) in (2, 4) and argv[0] == "summary":
        if len(argv) == 4 and argv[2] != "--tsv-out":
            return usage()
        return summary(argv[1], argv[3] if len(argv) == 4 else None)
    if len(argv) in (2, 3) and argv[0] == "wait-idle":
        return wait_idle(float(argv[1]), *(float(x) for x in argv[2:]))
    return usage()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
