"""The README's benchmark table from one bench/all.sh run: medians over the runs, ratios between
offload, its raw loops and the peers. Usage: python3 bench/summary.py RESULTS_DIR"""
import glob
import json
import os
import re
import statistics
import sys

out = sys.argv[1]


def lines(name):
    path = os.path.join(out, name)
    return [json.loads(l) for l in open(path)] if os.path.exists(path) else []


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def peer(app, name, get):
    """Median over the runs of one peer measurement (the peers' bench.sh raw JSON files)."""
    values = []
    for path in sorted(glob.glob(os.path.join(out, "peers-*", "raw", f"{app}-{name}.json"))):
        try:
            values.append(get(json.load(open(path))))
        except (KeyError, ValueError, TypeError):
            pass
    return med(values)


def fmt(v, digits=1):
    return "–" if v is None else f"{v:,.{digits}f}"


def ratio(a, b, digits=2):
    return "–" if a is None or b is None or b == 0 else f"{a / b:.{digits}f}×"


pdf = lines("pdf-batch.jsonl")
thumbs = lines("thumbnails.jsonl")
health = lines("responsiveness.jsonl")
rows = []
for pages, n in ((1, 500), (20, 50)):
    runs = [r for r in pdf if r["pages"] == pages]
    svc = med([r["service"]["jobs_per_s"] for r in runs])
    raw = med([r["raw"]["jobs_per_s"] for r in runs])
    in_run = med([r["ratio"] for r in runs])
    bg = peer("bg", f"t2-p{pages}", lambda o: o["completed_per_s"])
    celery = peer("celery", f"t2-p{pages}", lambda o: o["completed_per_s"])
    rows.append((f"completed {pages}-page PDF jobs/s ({n} jobs)", fmt(svc), fmt(raw),
                 "–" if in_run is None else f"{in_run:.2f}", fmt(bg), fmt(celery),
                 ratio(svc, max(filter(None, [bg, celery]), default=None), 1), ratio(svc, celery, 1)))
for label, key in (("1920×1080", "1920x1080"), ("4000×3000", "4000x3000")):
    runs = [r for r in thumbs if key in r["image"]]
    svc = med([r["jobs_per_s"] for r in runs])
    raw = med([r["raw_jobs_per_s"] for r in runs])
    in_run = med([r["ratio"] for r in runs])
    bg = celery = None
    if key == "1920x1080":
        bg = peer("bg", "t2-thumb", lambda o: o["completed_per_s"])
        celery = peer("celery", "t2-thumb", lambda o: o["completed_per_s"])
    rows.append((f"thumbnail jobs/s, {label} JPEG (100 uploads)", fmt(svc), fmt(raw),
                 "–" if in_run is None else f"{in_run:.2f}", fmt(bg), fmt(celery),
                 ratio(svc, max(filter(None, [bg, celery]), default=None), 1), ratio(svc, celery, 1)))
p99 = lambda o: o["latencyPercentiles"]["p99"] * 1000
for scenario, peer_name, label in (("idle", "t3-idle", "idle"),
                                   ("saturated-p1", "t3-load-p1", "1-page jobs saturating the workers"),
                                   ("saturated-p20", "t3-load-p20", "20-page jobs saturating the workers")):
    svc = med([h["p99_ms"] for h in health if h["scenario"] == scenario])
    bg = peer("bg", peer_name, p99)
    celery = peer("celery", peer_name, p99)
    best = min(filter(None, [bg, celery]), default=None)
    rows.append((f"`/healthz` p99 ms, {label}", fmt(svc, 2), "", "", fmt(bg, 2), fmt(celery, 2),
                 ratio(best, svc, 1) + " faster" if svc and best else "–",
                 ratio(celery, svc, 1) + " faster" if svc and celery else "–"))
idle = med([h["p99_ms"] for h in health if h["scenario"] == "idle"])
for s in ("saturated-p1", "saturated-p20"):
    sat = med([h["p99_ms"] for h in health if h["scenario"] == s])
    rows.append((f"`/healthz` p99 {s} / idle (target ≤ 3×)", ratio(sat, idle, 1), "", "", "", "", "", ""))
for pages in (1, 20):
    svc = med([r["service"]["peak_rss_mib"] for r in pdf if r["pages"] == pages])
    bg = peer("bg", f"t2-p{pages}-rss", lambda o: o["peak_rss_mib_total"])
    celery = peer("celery", f"t2-p{pages}-rss", lambda o: o["peak_rss_mib_total"])
    rows.append((f"peak RSS MiB, {pages}-page batch", fmt(svc), "", "", fmt(bg), fmt(celery),
                 ratio(min(filter(None, [bg, celery]), default=None), svc, 1) + " less" if svc and (bg or celery) else "–",
                 ratio(celery, svc, 1) + " less" if svc and celery else "–"))

head = ("scenario", "offload", "raw loop", "offload / raw (in-run median)", "BackgroundTasks", "Celery",
        "offload vs best peer", "offload vs Celery")
peer_runs = len(glob.glob(os.path.join(out, "peers-*", "raw", "celery-t2-p1.json")))
print(f"Medians of {len([r for r in pdf if r['pages'] == 1])} offload runs and {peer_runs} peer runs, {out}\n")
print("| " + " | ".join(head) + " |")
print("|" + "---|" * len(head))
for r in rows:
    print("| " + " | ".join(r) + " |")

dur = lines("durability.jsonl")
if dur:
    stores = ("memory", "sqlite_full", "sqlite_normal")
    by = lambda scenario: [d for d in dur if d["scenario"] == scenario]
    in_run = lambda runs, key: "–" if med([r.get(key) for r in runs]) is None else f"{med([r.get(key) for r in runs]):.2f}"
    drows = []
    for pages, n, target in ((1, 500, "full / memory ≥ 0.9"), (20, 50, "full / memory ≥ 0.95")):
        runs = [d for d in by("pdf") if d["pages"] == pages]
        drows.append((f"completed {pages}-page PDF jobs/s ({n} jobs)",
                      *(fmt(med([r[s]["jobs_per_s"] for r in runs])) for s in stores),
                      in_run(runs, "ratio_full"), in_run(runs, "ratio_normal"), target))
    runs = by("submit")
    drows.append(("submit req/s, 20,000 at c 64, room for every job",
                  *(fmt(med([r[s]["req_per_s"] for r in runs]), 0) for s in stores),
                  in_run(runs, "ratio_full"), in_run(runs, "ratio_normal"), "full / memory ≥ 0.5"))
    for q, target in (("p50", ""), ("p99", "sqlite ≤ 15 ms")):
        drows.append((f"submit {q} ms", *(fmt(med([r[s][f"{q}_ms"] for r in runs]), 2) for s in stores),
                      "", "", target))
    drows.append(("submit: every response 202, every job ended",
                  *(("yes" if all(r[s]["only_202"] and r[s]["all_ended"] for r in runs) else "NO") if runs else "–"
                    for s in stores), "", "", "all"))
    runs = by("restart")
    if runs:
        jobs, db, wal = runs[0]["jobs"], runs[0]["db_bytes"], runs[0]["wal_bytes"]
        drows.append((f"restart to `/readyz` 200, s ({jobs:,} jobs, offload.db {db / 2**20:,.0f} MiB + "
                      f"WAL {wal / 2**20:,.0f} MiB; memory: empty)",
                      *(fmt(med([r[s]["ready_s"] for r in runs]), 3) for s in stores), "", "", "≤ 1 s"))
    for r in by("rss")[-1:]:
        drows.append((f"restart, s ({r['jobs']:,} jobs, {r['result_bytes'] / 2**30:.2f} GiB of results; one run)", "",
                      fmt(r["restart"]["ready_s"], 3), "", "", "", "≤ 1 s"))
        drows.append((f"RSS MiB after restart + GETs, VmHWM / VmRSS ({r['jobs']:,} jobs, "
                      f"{r['result_bytes'] / 2**30:.2f} GiB of results; one run)", "",
                      f"{fmt(r['vmhwm_mib'])} / {fmt(r['vmrss_mib'])}", "", "", "", "≤ 64 MiB"))
    for r in by("churn")[-1:]:
        mib = lambda b: None if b is None else b / 2**20
        label = f"churn {r['duration_s']} s at {r['rate']}/s, TTL {r['ttl_s']} s (one run)"
        drows.append((f"{label}: max offload.db-wal MiB", "", fmt(mib(r["max_wal_bytes"])), "", "", "", "≤ 64 MiB"))
        drows.append((f"{label}: offload.db MiB at {r['first_t']} s → {r['last_t']} s", "",
                      f"{fmt(mib(r['db_bytes_first']))} → {fmt(mib(r['db_bytes_last']))}", "", "", "", "flat"))
        drows.append((f"{label}: every response 202", "", "yes" if r["only_202"] else f"NO {r['codes']}", "", "", "",
                      "all"))
    dhead = ("durable store (bench/durability.sh)", "memory", "sqlite full", "sqlite normal",
             "full / memory (in-run median)", "normal / memory (in-run median)", "target")
    print(f"\nDurable store: medians of {len(by('submit'))} runs (memory, sqlite --sync full, sqlite --sync normal, "
          f"data dirs on {dur[0].get('fs', '?')})\n")
    print("| " + " | ".join(dhead) + " |")
    print("|" + "---|" * len(dhead))
    for r in drows:
        print("| " + " | ".join(r) + " |")

print("\nCPU per completed PDF job (median ms; schedstat of the server's threads vs the raw loop's busy time):\n")
for pages in (1, 20):
    runs = [r for r in pdf if r["pages"] == pages]
    if not runs:
        continue
    names = sorted({k for r in runs for k in r["service"]["other_cpu_ms"]})
    parts = ", ".join(f"{n} {med([r['service']['other_cpu_ms'].get(n, 0) for r in runs]):.3f}" for n in names)
    print(f"- {pages}-page: pdf-worker {med([r['service']['worker_cpu_ms_per_job'] for r in runs]):.3f}, {parts}; "
          f"raw loop {med([r['raw']['mean_ms'] for r in runs]):.3f}")
for name in ("overload.txt", "submit.txt", "ws-fanout.txt"):
    path = os.path.join(out, name)
    if os.path.exists(path):
        text = open(path).read()
        keep = [l for l in text.splitlines() if re.match(r"(requests/s|status codes|latency|peak RSS|accepted|clients|OK|FAILED)", l)]
        print(f"\n{name}:\n" + "\n".join("    " + l for l in keep))
