"""Keep OUTSTANDING PDF jobs in flight on an offload server for SECONDS, like the peers' saturating
driver: submit until OUTSTANDING jobs are pending, poll only the oldest every 20 ms.
Usage: python3 bench/saturate.py URL PAGES OUTSTANDING SECONDS  (prints one JSON line)"""
import http.client, json, subprocess, sys, time
from collections import deque
from urllib.parse import urlparse

url, pages, outstanding, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
body = subprocess.run(["bash", "bench/peers.sh", "body", str(pages)], capture_output=True, text=True, check=True).stdout
u = urlparse(url)
conn = http.client.HTTPConnection(u.hostname, u.port)

def call(method, path, payload=None):
    headers = {"content-type": "application/json"} if payload else {}
    conn.request(method, path, body=payload, headers=headers)
    r = conn.getresponse()
    return r.status, json.loads(r.read() or b"null")

pending, submitted, completed, errors = deque(), 0, 0, 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    while len(pending) < outstanding:
        status, job = call("POST", "/generate-pdf", body)
        submitted += 1
        if status == 202:
            pending.append(job["id"])
        else:
            errors += 1
            break
    if pending:
        _, job = call("GET", f"/jobs/{pending[0]}")
        if job["status"] in ("succeeded", "failed", "cancelled"):
            pending.popleft()
            completed += 1
            continue
    time.sleep(0.02)
print(json.dumps({"pages": pages, "outstanding": outstanding, "submitted": submitted, "completed": completed,
                  "errors": errors, "completed_per_s": round(completed / seconds, 1)}))
