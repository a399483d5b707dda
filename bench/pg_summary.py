"""Medians of bench/postgres.sh and bench/postgres_events.sh output (their JSON lines, in any
files given), as the README's PostgreSQL table. Ratios are taken within each run, then the median
of those. Usage: python3 bench/pg_summary.py OUTPUT_FILE..."""
import json
import statistics
import sys

rows = []
for path in sys.argv[1:]:
    for line in open(path):
        line = line.strip()
        if line.startswith("{"):
            rows.append(json.loads(line))


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=0):
    if v is None:
        return "–"
    return f"{v:,.{digits}f}"


# bench/postgres.sh: lines without "figure", in runs of sqlite, postgres-1, postgres-2.
batches = [r for r in rows if "figure" not in r]
by_store = {}
ratios = {"postgres-1": [], "postgres-2": []}
embedded = None
for r in batches:
    by_store.setdefault(r["store"], []).append(r)
    if r["store"] == "sqlite":
        embedded = r["jobs_per_s"]
    elif embedded:
        ratios[r["store"]].append(r["jobs_per_s"] / embedded)

print("| store | completed one-page PDF jobs/s | vs embedded (in-run median) | submit p50 / p99 ms | jobs run by each instance |")
print("|---|---|---|---|---|")
names = {"sqlite": "embedded (SQLite)", "postgres-1": "postgres, one instance", "postgres-2": "postgres, two instances"}
for store in ["sqlite", "postgres-1", "postgres-2"]:
    rs = by_store.get(store, [])
    if not rs:
        continue
    ratio = "1" if store == "sqlite" else f"{med(ratios[store]):.2f}×"
    split = f"{fmt(med([r['ran_on_first'] for r in rs]))} / {fmt(med([r['ran_on_second'] for r in rs]))}" if store == "postgres-2" else fmt(med([r["ran_on_first"] for r in rs]))
    print(f"| {names[store]} | {fmt(med([r['jobs_per_s'] for r in rs]))} | {ratio} | "
          f"{fmt(med([r['submit_p50_ms'] for r in rs]), 1)} / {fmt(med([r['submit_p99_ms'] for r in rs]), 1)} | {split} |")

print()
submits = [r for r in rows if r.get("figure") == "submit"]
if submits:
    print("| submissions (10,000 one-page PDFs at oha -c 64, all admitted) | submissions/s | p50 / p99 ms |")
    print("|---|---|---|")
    for store in ["sqlite", "postgres-1"]:
        rs = [r for r in submits if r["store"] == store]
        print(f"| {names[store]} | {fmt(med([r['requests_per_s'] for r in rs]))} | "
              f"{fmt(med([r['p50_ms'] for r in rs]), 1)} / {fmt(med([r['p99_ms'] for r in rs]), 1)} |")
    print()
events = [r for r in rows if r.get("figure") == "events"]
if events:
    print("| WebSocket event latency, 1,000 clients, postgres | p50 ms | p99 ms | max ms | events | missing |")
    print("|---|---|---|---|---|---|")
    for where, label in [("same", "followed on the instance running the jobs"), ("other", "followed on another instance")]:
        rs = [r for r in events if r["followed_on"] == where]
        for part, what in [("running_ms", "running"), ("ended_ms", "ended")]:
            print(f"| {label}: {what} | {fmt(med([r[part]['p50'] for r in rs]), 1)} | {fmt(med([r[part]['p99'] for r in rs]), 1)} | "
                  f"{fmt(med([r[part]['max'] for r in rs]), 1)} | {fmt(med([r[part]['events'] for r in rs]))} | "
                  f"{fmt(sum(r['missing'] for r in rs))} |")
    print()
reruns = [r for r in rows if r.get("figure") == "rerun"]
if reruns:
    values = [r["kill_to_all_rerun_s"] for r in reruns]
    print(f"kill -9 to every job the instance was running started again elsewhere (--lease 10s): median "
          f"{med(values):.2f} s (runs: {', '.join(f'{v:.2f}' for v in values)}; "
          f"{', '.join(str(r['running_at_kill']) for r in reruns)} jobs running at the kill)")
