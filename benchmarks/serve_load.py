"""The server under load: clients mixing good, hostile and cancelled requests, for a bounded
time, against a `sparrow serve` process this script starts itself.

    python benchmarks/serve_load.py                                # reference target + Sparrow draft
    python benchmarks/serve_load.py --target tiny:qwen2_vl --draft none --seconds 30

The server: `sparrow serve --target T [--draft D] --api-key K --media-root DIR --max-queue 4
--max-tokens 48 --timeout 30 --max-preprocess 2 --prefix-cache-mb 512` (--max-video-pixels at
its default, 4096x2160).
Each of `--clients` threads loops until `--seconds` are up, drawing its next request
(seeded) from KINDS below:

  good       a question about a video under the media root; an uploaded video (data URL); a
             3840x2160 upload (decoded, scaled as it is read); a streamed text question; a
             sampled question with n=2 and logprobs; a /v1/completions prompt
  hostile    each with the status it must get: a 4032x4032 upload (400, read from the
             container before decoding), a corrupt video (400), a path out of the media root
             (403), JSON nested 100,000 deep (400), a lone surrogate (400), an unsupported field
             (400), a wrong key (401), max_tokens over the limit (400), a body that declares
             1000 bytes and stalls (408 after --timeout)
  cancelled  a stream dropped after its first chunk; a request abandoned after 0.5 s

Outcomes: `completed` (a good request answered 200), `refused` (a good one answered 429 with
Retry-After, or 504: the server's bounds under overload; the client waits Retry-After, at most
2 s), `rejected` (a hostile one answered its expected status), `cancelled`, and `failed`:
anything else (a 5xx, a wrong status, a connection error, a 429 without Retry-After). Also
p50 / p95 latency of the completed requests by kind, the server's peak RSS (VmHWM) and its RSS
over time. At the end the server must still answer, and the responses it counted in /metrics
(by status) must equal what the clients saw (nothing lost, nothing answered twice); the exit
status is 1 otherwise, or when any request failed. Writes serve_load.{json,md,png} under --out.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import requests

from sparrow.machine import machine_info
from sparrow.video.io import write_video

KEY = "load-test-key"
QUEUE, MAX_TOKENS, TIMEOUT_S, PREFIX_CACHE_MB = 4, 48, 30, 512
GOOD = {"video_file": 3, "video_upload": 2, "uhd_upload": 1, "text_stream": 3, "n2_logprobs": 2,
        "completions": 2}
HOSTILE = {"huge_pixels": 400, "corrupt_video": 400, "outside_root": 403, "deep_json": 400,
           "lone_surrogate": 400, "unsupported_field": 400, "wrong_key": 401, "max_tokens_over": 400,
           "stalled_body": 408}
CANCELLED = ("stream_dropped", "abandoned")
# Draw weights: half good, a third hostile, the rest cancelled.
KINDS = (list(GOOD.items()) + [(kind, 6 / len(HOSTILE)) for kind in HOSTILE]
         + [(kind, 2) for kind in CANCELLED])


def make_media(root: Path) -> dict[str, str]:
    """The clips: a small moving square (file and upload), a 3840x2160 and a 4032x4032 upload
    (blocky: small files, full-size frames), a corrupt file."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 60, (8, 96, 128, 3), dtype=np.uint8)
    for t in range(8):
        frames[t, 30:60, 10 * t:10 * t + 30] = (200, 60, 40)
    write_video(root / "clip.mp4", frames, fps=4)
    media = {"clip": str(root / "clip.mp4")}
    for name, (width, height, count) in {"uhd": (3840, 2160, 4), "huge": (4032, 4032, 2)}.items():
        small = rng.integers(0, 255, (count, height // 64, width // 64, 3), dtype=np.uint8)
        path = root / f"{name}.mp4"
        write_video(path, small.repeat(64, axis=1).repeat(64, axis=2), fps=4, codec="mpeg4")
        media[name] = "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()
    media["upload"] = "data:video/mp4;base64," + base64.b64encode((root / "clip.mp4").read_bytes()).decode()
    (root / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    media["corrupt"] = str(root / "corrupt.mp4")
    return media


class Server:
    """`sparrow serve` in its own process; `rss` samples its resident memory over time."""

    def __init__(self, args, media_root: Path):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        command = [sys.executable, "-m", "sparrow.cli", "serve", "--target", args.target,
                   "--port", str(self.port), "--api-key", KEY, "--media-root", str(media_root),
                   "--max-queue", str(QUEUE), "--max-tokens", str(MAX_TOKENS),
                   "--timeout", str(TIMEOUT_S), "--max-preprocess", "2", "--num-frames", "4",
                   "--prefix-cache-mb", str(PREFIX_CACHE_MB)]
        if args.draft != "none":
            command += ["--draft", args.draft]
        self.command = command
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.rss: list[tuple[float, float]] = []  # (seconds since start, MB)
        self.started = time.monotonic()
        deadline = time.monotonic() + 600
        while True:
            try:
                health = requests.get(f"{self.url}/health", timeout=2)
                if health.ok:
                    break
            except requests.ConnectionError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start:\n{self.process.stderr.read()}")
            time.sleep(0.5)
        models = requests.get(f"{self.url}/v1/models", headers=self.headers(), timeout=10).json()
        self.model = models["data"][0]["id"]
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {KEY}"}

    def status(self, field: str) -> float:
        for line in open(f"/proc/{self.process.pid}/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no {field} in /proc/{self.process.pid}/status")

    def _sample(self) -> None:
        while not self._stop.wait(0.25):
            self.rss.append((time.monotonic() - self.started, self.status("VmRSS")))

    def stop(self) -> None:
        self._stop.set()
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)


def chat(server: Server, content, **fields) -> dict:
    return {"model": server.model, "max_tokens": 24, **fields,
            "messages": [{"role": "user", "content": content}]}


def video_content(url: str, question: str = "What moves?") -> list:
    return [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": question}]


def send(server: Server, kind: str, media: dict) -> tuple[str, int | None, float, str]:
    """One request of `kind`: (outcome, status, seconds, detail)."""
    url, headers = f"{server.url}/v1/chat/completions", server.headers()
    body, raw, stream, key = None, None, False, headers
    started = time.monotonic()
    if kind == "video_file":
        body = chat(server, video_content(media["clip"]))
    elif kind == "video_upload":
        body = chat(server, video_content(media["upload"], "Describe the colours."))
    elif kind == "uhd_upload":
        body = chat(server, video_content(media["uhd"]), max_tokens=8)
    elif kind == "text_stream":
        body, stream = chat(server, "Tell me a short story.", stream=True), True
    elif kind == "n2_logprobs":
        body = chat(server, "Name three colours.", n=2, temperature=0.8, seed=1, logprobs=True,
                    top_logprobs=2)
    elif kind == "completions":
        url, body = f"{server.url}/v1/completions", {"model": server.model, "prompt": "Once upon a time",
                                                     "max_tokens": 24}
    elif kind == "huge_pixels":
        body = chat(server, video_content(media["huge"]))
    elif kind == "corrupt_video":
        body = chat(server, video_content(media["corrupt"]))
    elif kind == "outside_root":
        body = chat(server, video_content(str(Path(media["clip"]).parent / ".." / "elsewhere.mp4")))
    elif kind == "deep_json":
        raw = b"[" * 100_000 + b"]" * 100_000
    elif kind == "lone_surrogate":
        raw = json.dumps(chat(server, "Hi")).replace("Hi", "\\ud800").encode()
    elif kind == "unsupported_field":
        body = chat(server, "Hi", response_format={"type": "json_object"})
    elif kind == "wrong_key":
        body, key = chat(server, "Hi"), {"Authorization": "Bearer wrong"}
    elif kind == "max_tokens_over":
        body = chat(server, "Hi", max_tokens=MAX_TOKENS + 1)
    elif kind == "stalled_body":
        return stalled_body(server, started)
    elif kind == "stream_dropped":
        with requests.post(url, json=chat(server, "Tell me a long story.", stream=True), headers=headers,
                           stream=True, timeout=TIMEOUT_S + 30) as response:
            if response.status_code != 200:
                return classify(kind, response, started)
            next(response.iter_lines())  # the first event, then the client leaves
        return "cancelled", 200, time.monotonic() - started, ""
    elif kind == "abandoned":
        try:
            response = requests.post(url, json=chat(server, "Tell me a story."), headers=headers, timeout=0.5)
        except requests.Timeout:
            return "cancelled", None, time.monotonic() - started, ""
        return classify(kind, response, started)
    data = raw if raw is not None else json.dumps(body).encode()
    response = requests.post(url, data=data, headers={**key, "Content-Type": "application/json"},
                             stream=stream, timeout=TIMEOUT_S + 30)
    if stream and response.status_code == 200:
        events = [line for line in response.iter_lines() if line]
        if events[-1] != b"data: [DONE]":
            return "failed", 200, time.monotonic() - started, f"stream ended with {events[-1][:120]!r}"
    return classify(kind, response, started)


def stalled_body(server: Server, started: float) -> tuple[str, int | None, float, str]:
    """A body that declares 1000 bytes and sends 9: the server must answer 408 itself."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT_S + 30) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\"".encode())
        reply = sock.recv(4096)
    status = int(reply.split()[1]) if reply.startswith(b"HTTP/1.1 ") else None
    outcome = "rejected" if status == HOSTILE["stalled_body"] else "failed"
    return outcome, status, time.monotonic() - started, "" if outcome == "rejected" else repr(reply[:120])


def classify(kind: str, response: requests.Response, started: float) -> tuple[str, int | None, float, str]:
    seconds, status = time.monotonic() - started, response.status_code
    if kind in HOSTILE:
        ok = status == HOSTILE[kind]
        return ("rejected" if ok else "failed"), status, seconds, "" if ok else response.text[:200]
    if status == 200:
        return "completed", status, seconds, ""
    if status == 429 and response.headers.get("Retry-After", "").isdigit() or status == 504:
        return "refused", status, seconds, response.headers.get("Retry-After", "")
    return "failed", status, seconds, response.text[:200]


def client(index: int, server: Server, media: dict, until: float, records: list, lock: threading.Lock):
    rng = random.Random(index)
    kinds, weights = zip(*KINDS, strict=True)
    while time.monotonic() < until:
        kind = rng.choices(kinds, weights)[0]
        try:
            outcome, status, seconds, detail = send(server, kind, media)
        except requests.RequestException as error:
            outcome, status, seconds, detail = "failed", None, 0.0, f"{type(error).__name__}: {error}"
        with lock:
            records.append({"client": index, "kind": kind, "outcome": outcome, "status": status,
                            "seconds": round(seconds, 3), "detail": detail,
                            "at_s": round(time.monotonic() - server.started, 2)})
        if outcome == "refused" and status == 429:
            time.sleep(min(2.0, float(detail or 1)))


def server_counts(server: Server) -> dict[str, float]:
    counts = {}
    for line in requests.get(f"{server.url}/metrics", headers=server.headers(), timeout=10).text.splitlines():
        if line.startswith("sparrow_http_responses_total{"):
            status = line.split('status="')[1].split('"')[0]
            counts[status] = float(line.split()[-1])
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="reference")
    parser.add_argument("--draft", default="reference:sparrow", help="a draft, or 'none' (plain decoding)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--out", default="benchmarks/results/serve_load")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "media"
        root.mkdir()
        media = make_media(root)
        print(f"starting: sparrow serve --target {args.target} --draft {args.draft}", file=sys.stderr)
        server = Server(args, root)
        idle_mb = server.status("VmRSS")
        records: list[dict] = []
        lock = threading.Lock()
        until = time.monotonic() + args.seconds
        load_started = time.monotonic() - server.started
        threads = [threading.Thread(target=client, args=(i, server, media, until, records, lock))
                   for i in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.monotonic() - server.started - load_started
        alive = requests.post(f"{server.url}/v1/chat/completions", headers=server.headers(),
                              json=chat(server, "Still there?", max_tokens=4),
                              timeout=TIMEOUT_S).status_code == 200
        counted = server_counts(server)
        peak_mb = server.status("VmHWM")
        server.stop()
    report = summarise(args, records, counted, idle_mb, peak_mb, alive, wall, server)
    (out / "serve_load.json").write_text(json.dumps({**report, "requests": records}, indent=1))
    (out / "serve_load.md").write_text(markdown(report))
    plot(report, server.rss, load_started, out / "serve_load.png")
    print(markdown(report))
    return 0 if report["failed"] == 0 and alive and report["counts_match"] else 1


def summarise(args, records, counted, idle_mb, peak_mb, alive, wall, server) -> dict:
    outcomes = Counter(r["outcome"] for r in records)
    latency = defaultdict(list)
    for r in records:
        if r["outcome"] == "completed":
            latency[r["kind"]].append(r["seconds"])
    every = sorted(s for values in latency.values() for s in values)

    def quantiles(values):
        if len(values) < 2:
            only = values[0] if values else None
            return {"n": len(values), "p50_s": only, "p95_s": only}
        q = statistics.quantiles(values, n=20, method="inclusive")
        return {"n": len(values), "p50_s": round(statistics.median(values), 3), "p95_s": round(q[18], 3)}

    # What the server must have counted: every status the clients saw, an abandoned request as
    # 499, and the script's own three calls (the first /health, /v1/models, the last question).
    client_statuses = Counter(str(r["status"]) for r in records if r["status"] is not None)
    client_statuses["499"] += sum(1 for r in records if r["kind"] == "abandoned" and r["status"] is None)
    client_statuses["200"] += 3
    return {
        "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]),
        "server_command": " ".join(["sparrow", *server.command[3:]]).replace(KEY, "K"),
        "date": time.strftime("%Y-%m-%d"), "machine": machine_info(),
        "clients": args.clients, "seconds": args.seconds, "wall_s": round(wall, 1),
        "requests": len(records), **{k: outcomes.get(k, 0) for k in
                                      ("completed", "refused", "rejected", "cancelled", "failed")},
        "five_xx": sum(1 for r in records if (r["status"] or 0) >= 500 and r["status"] != 504),
        "by_kind": {kind: dict(Counter(r["outcome"] for r in records if r["kind"] == kind))
                    for kind in sorted({r["kind"] for r in records})},
        "latency_completed": {"all": quantiles(every),
                              **{k: quantiles(sorted(v)) for k, v in latency.items()}},
        "rss_mb": {"idle": round(idle_mb), "peak": round(peak_mb), "growth": round(peak_mb - idle_mb)},
        "alive_after": alive, "server_counted": counted, "client_counted": dict(client_statuses),
        "counts_match": ({k: int(v) for k, v in counted.items() if v}
                         == {k: v for k, v in client_statuses.items() if v}),
        "failures": [r for r in records if r["outcome"] == "failed"][:20],
    }


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# Serve under load ({report['date']}, {m['cpu']}, {m['cpu_isa']}, {m['logical_cpus']} CPUs)", "",
        f"`{report['command']}`", "", f"Server: `{report['server_command']}`", "",
        f"{report['clients']} clients for {report['seconds']:g} s (wall {report['wall_s']} s): "
        f"{report['requests']} requests.", "",
        "| completed | refused (429/504) | rejected as expected (4xx) | cancelled | failed | 5xx |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {report['completed']} | {report['refused']} | {report['rejected']} | {report['cancelled']} "
        f"| **{report['failed']}** | **{report['five_xx']}** |", "",
        "| completed requests | n | p50 s | p95 s |", "|---|---:|---:|---:|",
    ]
    for kind, q in report["latency_completed"].items():
        lines.append(f"| {kind} | {q['n']} | {q['p50_s']} | {q['p95_s']} |")
    rss = report["rss_mb"]
    lines += ["", f"Server RSS: idle {rss['idle']} MB, peak {rss['peak']} MB (VmHWM; growth "
              f"{rss['growth']} MB). "
              f"Answering after the load: {'yes' if report['alive_after'] else '**no**'}.", "",
              "| kind | outcomes |", "|---|---|"]
    for kind, outcomes in report["by_kind"].items():
        lines.append(f"| {kind} | {', '.join(f'{k} {v}' for k, v in sorted(outcomes.items()))} |")
    lines += ["", f"Nothing lost: the responses the server counted by status (/metrics) "
              f"{'equal' if report['counts_match'] else '**differ from**'} what the clients saw "
              f"(an abandoned request as 499, the script's own 3 calls included): "
              f"{dict(sorted((k, int(v)) for k, v in report['server_counted'].items()))} vs "
              f"{dict(sorted(report['client_counted'].items()))}."]
    for failure in report["failures"]:
        lines.append(f"- failed: {failure['kind']} -> {failure['status']}: {failure['detail']}")
    return "\n".join(lines) + "\n"


def plot(report: dict, rss: list[tuple[float, float]], load_started: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    if rss:
        left.plot([t - load_started for t, _ in rss], [mb for _, mb in rss], lw=1)
    peak = report["rss_mb"]["peak"]
    left.axhline(peak, color="grey", ls=":", lw=1, label=f"peak {peak} MB")
    left.set_xlabel("seconds since the load began")
    left.set_ylabel("server RSS (MB)")
    left.legend(loc="lower right")
    kinds = list(report["by_kind"])
    order = ("completed", "refused", "rejected", "cancelled", "failed")
    bottom = np.zeros(len(kinds))
    for outcome in order:
        counts = np.array([report["by_kind"][k].get(outcome, 0) for k in kinds])
        right.barh(kinds, counts, left=bottom, label=outcome)
        bottom += counts
    right.set_xlabel("requests")
    right.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"sparrow serve under {report['clients']} clients: {report['failed']} failed, "
                 f"{report['five_xx']} 5xx; completed p50 {report['latency_completed']['all']['p50_s']} s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
