"""Hostile-client measurements of one offload binary: what nine abusive requests cost the server.

Usage: python3 bench/hostile.py --bin PATH [--only N]   (N = 1..9; default all)

Every attack gets a FRESH server (`BIN --bind 127.0.0.1:PORT --data-dir <mktemp -d> [flags]`, the
default SQLite store), started after `GET /healthz` answers 200 and killed (SIGTERM, then SIGKILL
after 2 s) in a `finally`, its data directory removed. Memory is read from /proc/PID/status just
before and just after the attack: VmRSS (resident now) and VmHWM (peak resident so far); growth is
reported in MiB (after - before). Each attack runs under a 70 s alarm and every socket has a
timeout, so no attack can hang the script.

 1. metric series: 5,000 `GET /healthz` with made-up methods M0001..M5000 on one keep-alive raw
    HTTP/1.1 connection; then the number of `/metrics` lines starting with
    `http_request_duration_seconds_bucket` (the service prefixes its metrics with `offload_`, so
    `offload_http_request_duration_seconds_bucket` lines are counted as well), its size, RSS growth.
 2. PDF cost: 50 columns x 100,000 empty rows (~400 KB of JSON); status, final job state (polled
    up to 60 s), wall time, VmHWM growth.
 3. stalled JSON bodies: 40 raw connections declaring Content-Length 8,000,000, sending 4,000,000
    bytes and then nothing; answers seen while sending, connections still open and RSS growth 3 s
    later.
 4. multipart filename: a chunked POST /images whose `file` part has a 100 MiB filename and a 1x1
    PNG body; status, VmHWM growth.
 5. analytics sink buffer: a sink that accepts and never answers; 100 events, each with a 4 MiB
    string property; answers by status, RSS growth 3 s later.
 6. GIF frame: a 1x1-screen GIF89a with one 12000x12000 image descriptor; status, job outcome,
    VmHWM growth.
 7. IPv6 webhooks: with --allow-private-webhooks, is a POST to http://[::1]:PORT/hook delivered
    within 10 s; without it, the status of three IPv4-embedding IPv6 callback URLs.
 8. WebSocket: one frame subscribing to 1,001 copies of one job's id (the reply), then one frame
    with 12,000 bad ids (reply frames and bytes within 2 s).
 9. access: with --api-keys (when the binary has it) the status of GET /jobs without a key and
    GET /jobs/{id} with the other key and with the owner's key; otherwise whether GET /jobs without
    a key lists a job just submitted.

Prints one markdown table (a row per attack) and, last, one JSON line with every figure.
Python 3.11 standard library only.
"""

import argparse
import http.client
import http.server
import json
import os
import re
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib

HOST = "127.0.0.1"
ATTACK_ALARM = 70  # seconds: the most one attack (server start included) may take


class AttackTimeout(Exception):
    pass


LIVE = set()  # servers started and not yet stopped, killed again at the end of every attack


def _on_alarm(signum, frame):
    raise AttackTimeout(f"attack took longer than {ATTACK_ALARM} s")


# ---------------------------------------------------------------------------------------------
# Server lifecycle and memory


def free_port(family=socket.AF_INET, host=HOST):
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Server:
    """A fresh offload process on a free port with its own data directory."""

    def __init__(self, binary, flags=()):
        self.binary, self.flags = binary, list(flags)
        self.proc = None
        self.data = None
        self.log = None

    def __enter__(self):
        self.port = free_port()
        self.data = tempfile.mkdtemp(prefix="offload-hostile.")
        self.log = open(os.path.join(self.data, "server.log"), "wb")
        cmd = [self.binary, "--bind", f"{HOST}:{self.port}", "--data-dir", os.path.join(self.data, "db"), *self.flags]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd="/work/main")
        LIVE.add(self)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.tail()}")
            try:
                if request(self.port, "GET", "/healthz", timeout=1)[0] == 200:
                    return self
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.05)
        raise RuntimeError("server did not answer /healthz within 15 s")

    def __exit__(self, *exc):
        self.stop()
        return False

    def stop(self):
        LIVE.discard(self)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.log:
            self.log.close()
            self.log = None
        if self.data:
            shutil.rmtree(self.data, ignore_errors=True)
            self.data = None

    def alive(self):
        return self.proc.poll() is None

    def tail(self, n=400):
        try:
            with open(os.path.join(self.data, "server.log"), "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def mem(self):
        """(VmRSS, VmHWM) in kB, or (None, None) when the process is gone."""
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                text = f.read()
        except OSError:
            return (None, None)
        get = lambda k: int(re.search(rf"^{k}:\s+(\d+) kB", text, re.M).group(1))  # noqa: E731
        try:
            return (get("VmRSS"), get("VmHWM"))
        except AttributeError:  # a zombie has no Vm lines
            return (None, None)


def growth(before, after):
    """MiB grown per (rss, hwm), None where a reading is missing."""
    out = []
    for b, a in zip(before, after):
        out.append(None if a is None or b is None else round((a - b) / 1024, 1))
    return out


def fmt_s(v):
    return f"{v:.3f} s" if v < 1 else f"{v:.2f} s"


def fmt_mib(v):
    return "n/a (process gone)" if v is None else f"{v:+.1f} MiB"


def mem_fields(res, before, after):
    rss, hwm = growth(before, after)
    res.update(rss_before_kb=before[0], hwm_before_kb=before[1], rss_after_kb=after[0], hwm_after_kb=after[1],
               rss_growth_mib=rss, hwm_growth_mib=hwm)
    return rss, hwm


# ---------------------------------------------------------------------------------------------
# HTTP helpers


def request(port, method, path, body=None, headers=None, timeout=10):
    """One request on a new connection: (status, headers dict lower-case, body bytes)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data
    finally:
        conn.close()


def post_json(port, path, obj, headers=None, timeout=30):
    body = obj if isinstance(obj, (bytes, bytearray)) else json.dumps(obj).encode()
    h = {"Content-Type": "application/json", **(headers or {})}
    return request(port, "POST", path, body, h, timeout)


def jbody(data):
    try:
        return json.loads(data)
    except ValueError:
        return None


def err_code(data):
    j = jbody(data)
    if isinstance(j, dict) and isinstance(j.get("error"), dict):
        return j["error"].get("code")
    return None


def poll_job(port, job_id, limit=60.0, headers=None):
    """Polls GET /jobs/{id} until a final status or `limit` seconds: (status, error code, seconds)."""
    start = time.monotonic()
    last = None
    while True:
        try:
            st, _, data = request(port, "GET", f"/jobs/{job_id}", headers=headers, timeout=5)
            j = jbody(data) or {}
            last = j.get("status", f"http {st}")
            if last in ("succeeded", "failed", "cancelled"):
                code = (j.get("error") or {}).get("code") if isinstance(j.get("error"), dict) else None
                return last, code, time.monotonic() - start
        except (OSError, http.client.HTTPException) as e:
            last = f"poll error: {e.__class__.__name__}"
        if time.monotonic() - start > limit:
            return f"still {last} after {limit:.0f} s", None, time.monotonic() - start
        time.sleep(0.25)


class Buffered:
    """A socket and the bytes read from it but not yet consumed."""

    def __init__(self, sock):
        self.sock, self.buf = sock, b""

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def read_http_response(conn, deadline):
    """Reads one HTTP/1.1 response (Content-Length or chunked) from a Buffered: (status, headers, body)."""
    sock, buf = conn.sock, conn.buf

    def fill():
        nonlocal buf
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a full response")
        buf += chunk

    while b"\r\n\r\n" not in buf:
        fill()
    head, buf = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        n = int(headers["content-length"])
        while len(buf) < n:
            fill()
        body, buf = buf[:n], buf[n:]
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            while b"\r\n" not in buf:
                fill()
            size_line, buf = buf.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0], 16)
            while len(buf) < size + 2:
                fill()
            body += buf[:size]
            buf = buf[size + 2:]
            if size == 0:
                break
    else:
        body = b""
    conn.buf = buf
    return status, headers, body


class RawConn(Buffered):
    """A raw connection for hand-written requests."""

    def __init__(self, port, timeout=10):
        super().__init__(socket.create_connection((HOST, port), timeout=timeout))

    def send(self, data):
        self.sock.sendall(data)

    def response(self, timeout=10):
        return read_http_response(self, time.monotonic() + timeout)


def pdf_submit(port, title="t", headers=None, extra=None):
    st, _, data = post_json(port, "/generate-pdf", {"title": title, **(extra or {})}, headers=headers)
    j = jbody(data) or {}
    return st, j.get("id"), data


def tiny_png():
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)  # 1x1, 8-bit RGB
    idat = zlib.compress(b"\x00\xff\x00\x00")  # filter 0, one red pixel
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def multipart(parts, boundary):
    """parts: (name, filename or None, content type or None, bytes)."""
    out = b""
    for name, filename, ctype, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n".encode()
        if ctype:
            out += f"Content-Type: {ctype}\r\n".encode()
        out += b"\r\n" + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


# ---------------------------------------------------------------------------------------------
# Attacks. Each returns (sent, outcome, time, memory, dict of figures).


def attack_1(binary):
    with Server(binary) as srv:
        before = srv.mem()
        c = RawConn(srv.port, timeout=10)
        statuses = {}
        start = time.monotonic()
        done = 0
        note = ""
        try:
            for i in range(1, 5001):
                c.send(f"M{i:04d} /healthz HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
                st, h, _ = c.response(timeout=10)
                statuses[st] = statuses.get(st, 0) + 1
                done += 1
                if h.get("connection", "").lower() == "close":
                    note = f"; server closed the connection after request {i}"
                    break
        except (OSError, ConnectionError) as e:
            note = f"; connection ended after {done} requests ({e.__class__.__name__})"
        finally:
            c.close()
        elapsed = time.monotonic() - start
        st, _, metrics = request(srv.port, "GET", "/metrics", timeout=10)
        after = srv.mem()
        lines = metrics.decode(errors="replace").splitlines()
        bare = sum(1 for ln in lines if ln.startswith("http_request_duration_seconds_bucket"))
        prefixed = sum(1 for ln in lines if ln.startswith("offload_http_request_duration_seconds_bucket"))
        methods = len({m.group(1) for ln in lines
                       if (m := re.search(r'http_request_duration_seconds_bucket\{.*?method="([^"]*)"', ln))})
        res = dict(requests=done, statuses=statuses, seconds=round(elapsed, 2), metrics_status=st,
                   bucket_lines_bare=bare, bucket_lines_offload_prefixed=prefixed, method_labels=methods,
                   metrics_bytes=len(metrics))
        rss, _ = mem_fields(res, before, after)
        sts = ", ".join(f"{n}x{k}" for k, n in sorted(statuses.items()))
        outcome = (f"answers {sts}{note}; /metrics: {prefixed:,} `offload_http_request_duration_seconds_bucket` lines "
                   f"({bare} start with the bare name), {methods} method labels, {len(metrics):,} bytes")
        return (f"{done:,} requests M0001..M5000 /healthz, one connection", outcome, fmt_s(elapsed),
                f"RSS {fmt_mib(rss)}", res)


def attack_2(binary):
    body = json.dumps({"title": "amp", "table": {"columns": [f"c{i}" for i in range(50)],
                                                 "rows": [[] for _ in range(100000)]}}).encode()
    with Server(binary) as srv:
        before = srv.mem()
        start = time.monotonic()
        st, _, data = post_json(srv.port, "/generate-pdf", body, timeout=30)
        j = jbody(data) or {}
        final, code = None, err_code(data)
        if st == 202 and j.get("id"):
            final, code, _ = poll_job(srv.port, j["id"], limit=60)
        elapsed = time.monotonic() - start
        after = srv.mem()
        res = dict(body_bytes=len(body), status=st, code=code, job_status=final, seconds=round(elapsed, 2))
        _, hwm = mem_fields(res, before, after)
        outcome = f"{st}" + (f" {code}" if st != 202 else f"; job {final}" + (f" ({code})" if code else ""))
        return (f"{len(body):,} B: 50 columns x 100,000 empty rows", outcome, fmt_s(elapsed),
                f"HWM {fmt_mib(hwm)}", res)


def attack_3(binary):
    n, declared, sent_bytes = 40, 8_000_000, 4_000_000
    head = (f"POST /generate-pdf HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {declared}\r\n\r\n").encode()
    body = b'{"title": "' + b"a" * (sent_bytes - 11)
    with Server(binary) as srv:
        before = srv.mem()
        socks = []
        try:
            for _ in range(n):
                s = socket.create_connection((HOST, srv.port), timeout=5)
                s.setblocking(False)
                socks.append(s)
            progress = {s: 0 for s in socks}  # bytes of head+body sent
            data = head + body
            answers = {}  # sock -> status
            closed = set()
            sel = selectors.DefaultSelector()
            for s in socks:
                sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
            start = time.monotonic()
            bufs = {s: b"" for s in socks}
            while time.monotonic() - start < 15:
                pending_write = [s for s in socks if progress[s] < len(data) and s not in closed and s not in answers]
                if not pending_write:
                    break
                for key, ev in sel.select(timeout=0.5):
                    s = key.fileobj
                    if ev & selectors.EVENT_READ:
                        try:
                            chunk = s.recv(65536)
                        except (BlockingIOError, InterruptedError):
                            chunk = None
                        except OSError:
                            chunk = b""
                        if chunk == b"":
                            closed.add(s)
                            sel.unregister(s)
                            continue
                        if chunk:
                            bufs[s] += chunk
                            m = re.match(rb"HTTP/1\.1 (\d{3})", bufs[s])
                            if m and s not in answers:
                                answers[s] = int(m.group(1))
                    if ev & selectors.EVENT_WRITE and progress[s] < len(data) and s not in closed:
                        try:
                            progress[s] += s.send(data[progress[s]:progress[s] + 262144])
                        except (BlockingIOError, InterruptedError):
                            pass
                        except OSError:
                            closed.add(s)
                            sel.unregister(s)
                            continue
                        if progress[s] >= len(data):
                            sel.modify(s, selectors.EVENT_READ)
            send_secs = time.monotonic() - start
            # Catch answers sent right as the bodies finished.
            end = time.monotonic() + 0.3
            while time.monotonic() < end:
                for key, _ in sel.select(timeout=0.1):
                    s = key.fileobj
                    try:
                        chunk = s.recv(65536)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        chunk = b""
                    if not chunk:
                        closed.add(s)
                        sel.unregister(s)
                        continue
                    bufs[s] += chunk
                    m = re.match(rb"HTTP/1\.1 (\d{3})", bufs[s])
                    if m and s not in answers:
                        answers[s] = int(m.group(1))
            immediate = dict(answers)
            fully_sent = sum(1 for s in socks if progress[s] >= len(data))
            time.sleep(3)
            after = srv.mem()
            still_open, late = 0, {}
            for s in socks:
                try:
                    chunk = s.recv(65536, socket.MSG_PEEK)
                    if chunk == b"":
                        continue
                    m = re.match(rb"HTTP/1\.1 (\d{3})", bufs[s] + chunk)
                    if m and s not in immediate:
                        late[s] = int(m.group(1))
                    still_open += 1
                except (BlockingIOError, InterruptedError):
                    still_open += 1
                except OSError:
                    pass
            sel.close()
        finally:
            for s in socks:
                s.close()
        by_status = {}
        for st in immediate.values():
            by_status[st] = by_status.get(st, 0) + 1
        late_status = {}
        for st in late.values():
            late_status[st] = late_status.get(st, 0) + 1
        res = dict(connections=n, bodies_fully_sent=fully_sent, immediate_answers=by_status,
                   answers_in_next_3s=late_status, still_open_after_3s=still_open, send_seconds=round(send_secs, 2))
        rss, hwm = mem_fields(res, before, after)
        imm = ", ".join(f"{c}x{k}" for k, c in sorted(by_status.items())) or "none"
        outcome = (f"immediate answers: {sum(by_status.values())} ({imm}); {fully_sent}/{n} got all 4 MB in; "
                   f"after 3 s {still_open}/{n} still open")
        if late_status:
            outcome += "; answered during the 3 s: " + ", ".join(f"{c}x{k}" for k, c in sorted(late_status.items()))
        return ("40 conns, Content-Length 8,000,000, 4,000,000 B sent then silence", outcome,
                f"{send_secs:.2f} s sending + 3 s", f"RSS {fmt_mib(rss)} (HWM {fmt_mib(hwm)})", res)


def attack_4(binary):
    boundary = "hostileboundary7d3f"
    name_len = 100 * 1024 * 1024
    prefix = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"").encode()
    suffix = (b"\"\r\nContent-Type: image/png\r\n\r\n" + tiny_png() + f"\r\n--{boundary}--\r\n".encode())
    head = (f"POST /images HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Transfer-Encoding: chunked\r\n\r\n").encode()
    piece = b"a" * (1024 * 1024)

    def chunk(b):
        return f"{len(b):x}\r\n".encode() + b + b"\r\n"

    with Server(binary) as srv:
        before = srv.mem()
        s = socket.create_connection((HOST, srv.port), timeout=10)
        start = time.monotonic()
        sent = 0
        stop = None
        status, code = None, None
        try:
            s.sendall(head + chunk(prefix))
            s.setblocking(False)
            chunks = [chunk(piece)] * (name_len // len(piece)) + [chunk(suffix), b"0\r\n\r\n"]
            sel = selectors.DefaultSelector()
            sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
            idx, off = 0, 0
            while idx < len(chunks) and time.monotonic() - start < 60:
                events = sel.select(timeout=1)
                if any(ev & selectors.EVENT_READ for _, ev in events):
                    stop = "answered while the body was being sent"
                    break
                if any(ev & selectors.EVENT_WRITE for _, ev in events):
                    try:
                        n = s.send(chunks[idx][off:])
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as e:
                        stop = f"send failed ({e.__class__.__name__})"
                        break
                    off += n
                    sent += n
                    if off >= len(chunks[idx]):
                        idx, off = idx + 1, 0
            else:
                if idx < len(chunks):
                    stop = "body not all sent within 60 s"
            sel.close()
            s.setblocking(True)
            try:
                status, _, data = read_http_response(Buffered(s), time.monotonic() + 30)
                code = err_code(data)
                jobs = (jbody(data) or {}).get("jobs") if status == 202 else None
            except (OSError, ConnectionError) as e:
                jobs = None
                stop = (stop + "; " if stop else "") + f"no response ({e.__class__.__name__})"
        finally:
            s.close()
        elapsed = time.monotonic() - start
        job_final = None
        if jobs:
            job_final, jcode, _ = poll_job(srv.port, jobs[0]["id"], limit=20)
            job_final += f" ({jcode})" if jcode else ""
        after = srv.mem()
        res = dict(filename_bytes=name_len, bytes_sent=sent, status=status, code=code, note=stop,
                   job=job_final, seconds=round(elapsed, 2), server_alive=srv.alive())
        _, hwm = mem_fields(res, before, after)
        outcome = f"{status}" + (f" {code}" if code else "") + (f"; job {job_final}" if job_final else "")
        outcome += f"; {sent / 2**20:.0f} MiB sent" + (f" ({stop})" if stop else "")
        return ("chunked POST /images, 100 MiB filename + 1x1 PNG", outcome, fmt_s(elapsed),
                f"HWM {fmt_mib(hwm)}", res)


def attack_5(binary):
    sink = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sink.bind((HOST, 0))
    sink.listen(64)
    sink.settimeout(0.2)
    sink_port = sink.getsockname()[1]
    held, received, stop = [], [0], threading.Event()

    def sink_loop():  # accepts, reads and discards, never answers
        sel = selectors.DefaultSelector()
        sel.register(sink, selectors.EVENT_READ)
        while not stop.is_set():
            for key, _ in sel.select(timeout=0.2):
                if key.fileobj is sink:
                    try:
                        c, _ = sink.accept()
                    except OSError:
                        continue
                    c.setblocking(False)
                    held.append(c)
                    sel.register(c, selectors.EVENT_READ)
                else:
                    try:
                        d = key.fileobj.recv(1 << 20)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        d = b""
                    if not d:
                        sel.unregister(key.fileobj)
                    received[0] += len(d)
        sel.close()

    t = threading.Thread(target=sink_loop, daemon=True)
    t.start()
    big = "x" * (4 * 1024 * 1024)
    try:
        with Server(binary, ["--analytics-sink", f"http://{HOST}:{sink_port}/"]) as srv:
            before = srv.mem()
            statuses, codes = {}, {}
            start = time.monotonic()
            conn = http.client.HTTPConnection(HOST, srv.port, timeout=20)
            try:
                for i in range(100):
                    payload = json.dumps({"name": "x", "properties": {"blob": big}}).encode()
                    try:
                        conn.request("POST", "/analytics/events", body=payload,
                                     headers={"Content-Type": "application/json"})
                        r = conn.getresponse()
                        data = r.read()
                        st = r.status
                    except (OSError, http.client.HTTPException) as e:
                        st = f"error {e.__class__.__name__}"
                        data = b""
                        conn.close()
                        conn = http.client.HTTPConnection(HOST, srv.port, timeout=20)
                    statuses[st] = statuses.get(st, 0) + 1
                    c = err_code(data)
                    if c:
                        codes[c] = codes.get(c, 0) + 1
            finally:
                conn.close()
            send_secs = time.monotonic() - start
            time.sleep(3)
            after = srv.mem()
            res = dict(events=100, property_bytes=len(big), statuses={str(k): v for k, v in statuses.items()},
                       codes=codes, seconds=round(send_secs, 2), sink_connections=len(held),
                       sink_bytes_received=received[0])
            rss, hwm = mem_fields(res, before, after)
    finally:
        stop.set()
        t.join(2)
        for c in held:
            c.close()
        sink.close()
    sts = ", ".join(f"{n}x{k}" for k, n in sorted(statuses.items(), key=str))
    cs = ", ".join(f"{k}" for k in codes)
    outcome = (f"{sts}" + (f" ({cs})" if cs else "") +
               f"; sink: {len(held)} connections, {received[0] / 2**20:.0f} MiB received")
    return ("100 POST /analytics/events, 4 MiB string property each, sink never answers", outcome,
            f"{send_secs:.2f} s + 3 s", f"RSS {fmt_mib(rss)} (HWM {fmt_mib(hwm)})", res)


def gif_bomb(w=12000, h=12000):
    return (b"GIF89a" + bytes([1, 0, 1, 0, 0x80, 0, 0]) + bytes([0, 0, 0, 255, 255, 255]) + b"\x2c" +
            bytes([0, 0, 0, 0]) + struct.pack("<HH", w, h) + b"\x00" + bytes([2, 2, 0x4C, 0x01, 0]) + b"\x3b")


def attack_6(binary):
    gif = gif_bomb()
    boundary = "gifboundary91c2"
    body = multipart([("file", "frame.gif", "image/gif", gif)], boundary)
    with Server(binary) as srv:
        before = srv.mem()
        start = time.monotonic()
        st, _, data = request(srv.port, "POST", "/images", body,
                              {"Content-Type": f"multipart/form-data; boundary={boundary}"}, timeout=30)
        code = err_code(data)
        final = None
        if st == 202:
            jobs = (jbody(data) or {}).get("jobs") or []
            if jobs:
                final, code, _ = poll_job(srv.port, jobs[0]["id"], limit=60)
        elapsed = time.monotonic() - start
        after = srv.mem()
        res = dict(gif_bytes=len(gif), status=st, code=code, job_status=final, seconds=round(elapsed, 2),
                   server_alive=srv.alive())
        _, hwm = mem_fields(res, before, after)
        outcome = f"{st}" + (f" {code}" if st != 202 else f"; job {final}" + (f" ({code})" if code else ""))
        return (f"{len(gif)} B GIF89a, 1x1 screen, one 12000x12000 frame", outcome, fmt_s(elapsed),
                f"HWM {fmt_mib(hwm)}", res)


class _Hook(http.server.BaseHTTPRequestHandler):
    hits = []

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(n)
        _Hook.hits.append((time.monotonic(), self.path, n))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


class _V6Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


def attack_7(binary):
    res = {}
    _Hook.hits = []
    recv = _V6Server(("::1", 0), _Hook)
    rport = recv.server_address[1]
    t = threading.Thread(target=recv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    t.start()
    start = time.monotonic()
    try:
        with Server(binary, ["--allow-private-webhooks"]) as srv:
            before = srv.mem()
            t0 = time.monotonic()
            st, jid, data = pdf_submit(srv.port, "t", extra={"callback_url": f"http://[::1]:{rport}/hook"})
            got = None
            final = None
            if st == 202:
                while time.monotonic() - t0 < 10:
                    if _Hook.hits:
                        got = _Hook.hits[0][0] - t0
                        break
                    time.sleep(0.05)
                final, _, _ = poll_job(srv.port, jid, limit=2)
            after = srv.mem()
            res.update(private_allowed_status=st, private_allowed_code=err_code(data), job_status=final,
                       delivered=got is not None, delivered_after_s=None if got is None else round(got, 3),
                       hook_hits=len(_Hook.hits))
            mem_fields(res, before, after)
    finally:
        recv.shutdown()
        recv.server_close()
    refused = {}
    urls = ["http://[::ffff:0:7f00:1]/", "http://[64:ff9b:1::7f00:1]/", "http://[2002:7f00:1::1]/"]
    with Server(binary) as srv:
        for u in urls:
            st, _, data = pdf_submit(srv.port, "t", extra={"callback_url": u})
            refused[u] = f"{st}" + (f" {err_code(data)}" if err_code(data) else "")
    res["without_flag"] = refused
    elapsed = time.monotonic() - start
    d = res.get("delivered")
    outcome = (f"[::1] hook: submit {res.get('private_allowed_status')}, "
               + (f"POST received after {res['delivered_after_s']:.3f} s" if d else "no POST within 10 s")
               + f" (job {res.get('job_status')}); without the flag: "
               + ", ".join(f"`{u[8:-2]}` {v}" for u, v in refused.items()))
    return ("callback to http://[::1]:PORT/hook (flag on); 3 embedded-IPv4 literals (flag off)", outcome,
            fmt_s(elapsed), "", res)


# Minimal WebSocket client (RFC 6455): handshake, masked text frames out, unmasked frames in.


def ws_connect(port, timeout=5):
    s = socket.create_connection((HOST, port), timeout=timeout)
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    s.sendall((f"GET /ws HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = s.recv(4096)
        if not d:
            raise ConnectionError("closed during the handshake")
        buf += d
    head, rest = buf.split(b"\r\n\r\n", 1)
    if b" 101 " not in head.split(b"\r\n")[0]:
        raise ConnectionError(f"no upgrade: {head[:80]!r}")
    conn = Buffered(s)
    conn.buf = rest
    return conn


def ws_send(conn, text):
    payload = text.encode()
    n = len(payload)
    hdr = bytes([0x81])
    if n < 126:
        hdr += bytes([0x80 | n])
    elif n < 65536:
        hdr += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        hdr += bytes([0x80 | 127]) + struct.pack(">Q", n)
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    conn.sock.sendall(hdr + mask + masked)


def ws_recv(conn, deadline):
    """Next frame (opcode, payload) or None at the deadline."""
    s = conn.sock

    def need(n):
        while len(conn.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            s.settimeout(left)
            try:
                d = s.recv(65536)
            except socket.timeout:
                return False
            if not d:
                raise ConnectionError("closed")
            conn.buf += d
        return True

    if not need(2):
        return None
    b0, b1 = conn.buf[0], conn.buf[1]
    n, pos = b1 & 0x7F, 2
    if n == 126:
        if not need(4):
            return None
        n, pos = struct.unpack(">H", conn.buf[2:4])[0], 4
    elif n == 127:
        if not need(10):
            return None
        n, pos = struct.unpack(">Q", conn.buf[2:10])[0], 10
    if not need(pos + n):
        return None
    payload = conn.buf[pos:pos + n]
    conn.buf = conn.buf[pos + n:]
    return b0 & 0x0F, payload


def attack_8(binary):
    with Server(binary) as srv:
        before = srv.mem()
        st, jid, _ = pdf_submit(srv.port, "ws")
        if st != 202:
            raise RuntimeError(f"PDF submit answered {st}")
        s = ws_connect(srv.port)
        start = time.monotonic()
        try:
            ws_send(s, json.dumps({"subscribe": [jid] * 1001}, separators=(",", ":")))
            first = []
            deadline = time.monotonic() + 2
            while True:
                f = ws_recv(s, deadline)
                if f is None:
                    break
                if f[0] == 1:
                    first.append(jbody(f[1]) or {})
            t1 = time.monotonic() - start
            ids = ["1"] * 11850 + [f"a{i}" for i in range(150)]
            frame2 = json.dumps({"subscribe": ids}, separators=(",", ":"))
            ws_send(s, frame2)
            t2 = time.monotonic()
            frames, nbytes, kinds = 0, 0, {}
            deadline = time.monotonic() + 2
            while True:
                try:
                    f = ws_recv(s, deadline)
                except ConnectionError:
                    kinds["closed"] = 1
                    break
                if f is None:
                    break
                if f[0] == 1:
                    frames += 1
                    nbytes += len(f[1])
                    j = jbody(f[1]) or {}
                    k = j.get("code") or j.get("type")
                    kinds[k] = kinds.get(k, 0) + 1
                elif f[0] == 8:
                    kinds["close"] = kinds.get("close", 0) + 1
                    break
        finally:
            s.close()
        after = srv.mem()

        def describe(fr):
            if fr.get("type") == "error":
                return f"error {fr.get('code')}"
            if fr.get("type") == "job":
                return f"job frame ({(fr.get('job') or {}).get('status')})"
            return str(fr)[:60]

        res = dict(job_id=jid, first_replies=[describe(f) for f in first], second_frame_bytes=len(frame2),
                   second_reply_frames=frames, second_reply_bytes=nbytes, second_reply_kinds=kinds)
        mem_fields(res, before, after)
        firsts = ", ".join(describe(f) for f in first) or "no reply in 2 s"
        kinds_s = ", ".join(f"{n}x{k}" for k, n in kinds.items())
        outcome = (f"1,001 x same id: {firsts}; 12,000 bad ids ({len(frame2):,} B frame): {frames:,} reply frames, "
                   f"{nbytes:,} B ({kinds_s or 'none'})")
        return ("/ws: subscribe 1,001 copies of one id; then 12,000 bad ids", outcome,
                f"{t1:.2f} s + 2 s", "", res)


def attack_9(binary):
    help_text = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=10).stdout
    res = {"has_api_keys_flag": "--api-keys" in help_text}
    start = time.monotonic()
    if res["has_api_keys_flag"]:
        a, b = "alpha-key-0123456789abcdef", "bravo-key-0123456789abcdef"
        with Server(binary, ["--api-keys", f"{a},{b}"]) as srv:
            st, jid, _ = pdf_submit(srv.port, "mine", headers={"Authorization": f"Bearer {a}"})
            res["submit_key_a"] = st
            res["list_no_key"] = request(srv.port, "GET", "/jobs")[0]
            st_b, _, db = request(srv.port, "GET", f"/jobs/{jid}", headers={"Authorization": f"Bearer {b}"})
            st_a, _, _ = request(srv.port, "GET", f"/jobs/{jid}", headers={"Authorization": f"Bearer {a}"})
            res.update(get_key_b=st_b, get_key_b_code=err_code(db), get_key_a=st_a)
        outcome = (f"submit (key A) {res['submit_key_a']}; GET /jobs no key {res['list_no_key']}; "
                   f"GET /jobs/{{id}} key B {st_b}" + (f" {res['get_key_b_code']}" if res['get_key_b_code'] else "")
                   + f"; key A {st_a}")
        sent = "--api-keys A,B: job with key A, then reads"
    else:
        with Server(binary) as srv:
            st, jid, _ = pdf_submit(srv.port, "mine")
            lst, _, data = request(srv.port, "GET", "/jobs")
            listed = jid is not None and jid.encode() in data
            res.update(submit=st, list_no_key=lst, listed=listed)
        outcome = (f"no --api-keys flag (open service); submit {st}; GET /jobs without a key {lst}, "
                   + ("lists the job" if listed else "does not list the job"))
        sent = "submit a job, GET /jobs with no key"
    return (sent, outcome, f"{time.monotonic() - start:.2f} s", "", res)


ATTACKS = {
    1: ("1. metric series", attack_1),
    2: ("2. PDF cost", attack_2),
    3: ("3. stalled JSON bodies", attack_3),
    4: ("4. multipart filename", attack_4),
    5: ("5. analytics sink buffer", attack_5),
    6: ("6. GIF frame", attack_6),
    7: ("7. IPv6 webhooks", attack_7),
    8: ("8. WebSocket", attack_8),
    9: ("9. access", attack_9),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bin", required=True)
    p.add_argument("--only", type=int, choices=sorted(ATTACKS))
    args = p.parse_args()
    signal.signal(signal.SIGALRM, _on_alarm)
    rows, results = [], {}
    for n in ([args.only] if args.only else sorted(ATTACKS)):
        name, fn = ATTACKS[n]
        t0 = time.monotonic()
        signal.alarm(ATTACK_ALARM)
        try:
            sent, outcome, took, mem, res = fn(args.bin)
        except Exception as e:  # noqa: BLE001 - one failed attack must not stop the others
            sent, outcome, took, mem = "", f"NOT MEASURED: {e.__class__.__name__}: {e}", \
                f"{time.monotonic() - t0:.1f} s", ""
            res = {"error": f"{e.__class__.__name__}: {e}"}
        finally:
            signal.alarm(0)
            for srv in list(LIVE):  # a server an interrupted attack left running
                srv.stop()
        results[n] = res
        rows.append((name, sent, outcome, took, mem))
        print(f"[{name}] done in {time.monotonic() - t0:.1f} s", flush=True, file=sys.stderr)
    print(f"binary: {args.bin}\n")
    print("| attack | sent | outcome | time | memory growth |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
    print()
    print(json.dumps({"bin": args.bin, "results": results}, default=str))


if __name__ == "__main__":
    main()
