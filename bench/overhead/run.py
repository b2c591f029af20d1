"""Proxy overhead: one fast backend (nginx returning a static OpenAI answer; the sim
for streams) reached directly, through tierq (every feature on) on each upstream
client (`tierq`: client = "aiohttp", `tierq-core`: client = "core"), through a bare
aiohttp+uvloop forwarder, through nginx as a reverse proxy and through the LiteLLM
proxy, all in the same run, interleaved in rounds so drift on a shared machine hits
every path alike. Writes bench/results/<name>.md, .json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "common"))
import harness as h  # noqa: E402

HERE = Path(__file__).resolve().parent
STATIC_BODY = json.dumps({
    "id": "chatcmpl-static", "object": "chat.completion", "created": 1700000000,
    "model": "static-chat", "system_fingerprint": "fp_static", "service_tier": "default",
    "choices": [{"index": 0, "message": {"role": "assistant", "content":
                 "the quick brown fox jumps over a lazy dog while seven tired engines hum",
                 "refusal": None}, "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 6, "completion_tokens": 14, "total_tokens": 20},
}, separators=(",", ":"))
PATH = "/v1/chat/completions"


def nginx(name: str, servers: str) -> h.Proc:
    prefix = h.TMP / name
    prefix.mkdir(exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
error_log {prefix}/error.log warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fcgi; uwsgi_temp_path {prefix}/uwsgi; scgi_temp_path {prefix}/scgi;
  keepalive_requests 10000000;
  keepalive_timeout 60s;
{servers}
}}
""")
    port = int(re.search(r"listen 127\.0\.0\.1:(\d+)", servers).group(1))  # type: ignore[union-attr]
    p = h.Proc(name, [h.need("nginx"), "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"], port)
    p.wait_ready()
    return p


def static_backend() -> tuple[h.Proc, str]:
    """nginx answering every request with STATIC_BODY: a backend that is never the bottleneck."""
    port = h.free_port()
    be = nginx("nginx-backend", f"""
  server {{
    listen 127.0.0.1:{port};
    location / {{ default_type application/json; return 200 '{STATIC_BODY}'; }}
  }}""")
    return be, f"http://127.0.0.1:{port}"


# The gateway paths: target name -> its `[[upstreams]] client`.
TIERQ_CLIENTS = {"tierq": "aiohttp", "tierq-core": "core"}


def tierq_config(static_root: str, sim_root: str, client: str = "aiohttp") -> tuple[Path, str]:
    """An every-feature-on config whose upstreams use `client`; its own keys and ledger files."""
    tag = "" if client == "aiohttp" else f"-{client}"
    keys_db = h.TMP / f"overhead{tag}-keys.db"
    r = subprocess.run([h.PY, "-m", "tierq", "keys", "create", "bench", "--db", str(keys_db),
                        "--rpm", "1000000000", "--tpm", "1000000000"],
                       capture_output=True, text=True, check=True)
    token = r.stdout.strip().splitlines()[0]
    cfg = h.TMP / f"overhead{tag}.toml"
    cfg.write_text(f"""
# Every feature on: API keys with per-key rpm/tpm, ledger, priority tier with pricing,
# admission with a token bucket (limits set high enough never to bind).
[ledger]
url = "sqlite:///{h.TMP}/overhead{tag}-ledger.db"

[keys]
path = "{keys_db}"

[[upstreams]]
name = "static"
base_url = "{static_root}/v1"
kind = "openai"
client = "{client}"
max_connections = 1024

[[upstreams]]
name = "sim"
base_url = "{sim_root}/v1"
kind = "openai"
client = "{client}"
max_connections = 2048

[[models]]
id = "static-chat"
upstream = "static"
priority = true
input_per_m = "0.10"
output_per_m = "0.20"

[models.admission]
max_concurrency = 1024
queue_depth = 1024
rate = 1000000.0
burst = 1000000
priority_reserve = 0.2

[[models]]
id = "sim-chat"
upstream = "sim"
priority = true
input_per_m = "0.10"
output_per_m = "0.20"

[models.admission]
max_concurrency = 2048
queue_depth = 1024
rate = 1000000.0
burst = 1000000
""")
    return cfg, token


def litellm(static_root: str, sim_root: str, venv: Path) -> tuple[h.Proc, str]:
    cfg = h.TMP / "litellm.yaml"
    cfg.write_text(f"""
model_list:
  - model_name: static-chat
    litellm_params: {{model: openai/static-chat, api_base: "{static_root}/v1", api_key: sk-none}}
  - model_name: sim-chat
    litellm_params: {{model: openai/sim-chat, api_base: "{sim_root}/v1", api_key: sk-none}}
litellm_settings:
  drop_params: true
  telemetry: false
general_settings:
  disable_spend_logs: true
""")
    port = h.free_port()
    # LiteLLM refuses to start without a master key; tierq is measured with keys on too.
    key = "sk-bench-" + os.urandom(16).hex()
    env = {"LITELLM_MASTER_KEY": key, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
           "LITELLM_TELEMETRY": "False", "DISABLE_SCHEMA_UPDATE": "True"}
    p = h.Proc("litellm", [str(venv / "bin" / "litellm"), "--config", str(cfg), "--host",
                           "127.0.0.1", "--port", str(port), "--num_workers", "1"],
               port, env=env, health="/health/liveliness")
    p.wait_ready(timeout=180)
    return p, key


def gen(url: str, model: str, headers: list[list[str]], **kw: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    spec = {"url": url, "model": model, "headers": headers, "seed": 11,
            "priority_share": 1.0, "send_tier": True, "max_tokens": 16, **kw}
    return h.loadgen(spec)


def wrk_rps(url: str, model: str, headers: list[list[str]], conns: int, secs: float) -> float | None:
    exe = shutil.which("wrk")
    if exe is None:
        return None
    body = json.dumps({"model": model, "max_tokens": 16, "service_tier": "priority",
                       "messages": [{"role": "user", "content": "say something about heavy load tonight"}]})
    lua = h.TMP / "post.lua"
    hdr = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in headers)
    lua.write_text(f'wrk.method = "POST"\nwrk.body = {json.dumps(body)}\n'
                   f'wrk.headers["Content-Type"] = "application/json"\n{hdr}')
    r = subprocess.run([exe, "-t1", f"-c{conns}", f"-d{max(1, int(secs))}s", "-s", str(lua), url],
                       capture_output=True, text=True, timeout=secs + 30)
    m = re.search(r"Requests/sec:\s+([\d.]+)", r.stdout)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", r.stdout)
    if not m or non2xx:
        return None
    return float(m.group(1))


def ok(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r["a"] for r in recs if r["a"]["status"] == 200 and "err" not in r["a"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--targets", default="direct,tierq,tierq-core,forwarder,nginx,litellm")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sat-conns", type=int, default=64)
    ap.add_argument("--sat-s", type=float, default=5.0)
    ap.add_argument("--lat-s", type=float, default=5.0)
    ap.add_argument("--rate", type=float, default=20.0,
                    help="the fixed moderate rate for added latency: one every path, LiteLLM included, sustains")
    ap.add_argument("--streams", type=int, default=512)
    ap.add_argument("--stream-tokens-per-s", type=float, default=20.0)
    ap.add_argument("--stream-tokens", type=int, default=100)
    ap.add_argument("--stream-s", type=float, default=6.0)
    ap.add_argument("--wrk", action="store_true", help="also measure saturation with wrk (cross-check)")
    ap.add_argument("--profile", action="store_true", help="py-spy tierq at saturation")
    ap.add_argument("--litellm-venv", default=os.environ.get("LITELLM_VENV", str(h.ROOT / ".venv-litellm")))
    ap.add_argument("--name", default="overhead")
    args = ap.parse_args()
    names = [t for t in args.targets.split(",") if t]
    h.build_loadgen()
    machine = h.machine_line()
    procs: list[h.Proc] = []
    res: dict[str, Any] = {"args": vars(args), "machine": machine, "targets": names}
    try:
        be, static_root = static_backend()
        procs.append(be)
        sim = h.start_sim("overhead-sim", 4096, 0.0, args.stream_tokens_per_s)
        procs.append(sim)
        sim_root = f"http://127.0.0.1:{sim.port}"
        T: dict[str, dict[str, Any]] = {"direct": {"static": static_root, "sim": sim_root, "headers": []}}
        for n, client in TIERQ_CLIENTS.items():
            if n not in names:
                continue
            cfg, token = tierq_config(static_root, sim_root, client)
            port = h.free_port()
            gw = h.Proc(f"overhead-{n}", [h.PY, "-m", "tierq", "serve", "--config", str(cfg),
                                         "--host", "127.0.0.1", "--port", str(port)],
                        port, cwd=h.TMP, health="/healthz")
            procs.append(gw)
            gw.wait_ready()
            root = f"http://127.0.0.1:{port}"
            T[n] = {"static": root, "sim": root, "headers": [["authorization", f"Bearer {token}"]],
                    "pid": gw.pid, "pids": {"static": gw.pid, "sim": gw.pid}}
            h.log(f"{n} (client {client}) at {cfg}: {gw.pid}")
        if "forwarder" in names:
            roots: dict[str, Any] = {"pids": {}}
            for kind, up in (("static", static_root), ("sim", sim_root)):
                port = h.free_port()
                p = h.Proc(f"forwarder-{kind}", [h.PY, str(HERE / "forwarder.py"), up, str(port)], port)
                procs.append(p)
                p.wait_ready(path="/v1/models")
                roots[kind] = f"http://127.0.0.1:{port}"
                roots["pids"][kind] = p.pid
            T["forwarder"] = {**roots, "headers": []}
        if "nginx" in names:
            p1, p2 = h.free_port(), h.free_port()
            common = ("proxy_http_version 1.1; proxy_set_header Connection \"\"; ")
            px = nginx("nginx-proxy", f"""
  upstream static_be {{ server {static_root.removeprefix("http://")}; keepalive 512; }}
  upstream sim_be {{ server 127.0.0.1:{sim.port}; keepalive 1024; }}
  server {{ listen 127.0.0.1:{p1}; location / {{ proxy_pass http://static_be; {common} }} }}
  server {{ listen 127.0.0.1:{p2}; location / {{ proxy_pass http://sim_be; {common} proxy_buffering off; }} }}""")
            procs.append(px)
            T["nginx"] = {"static": f"http://127.0.0.1:{p1}", "sim": f"http://127.0.0.1:{p2}", "headers": [],
                          "pids": {"static": px.pid, "sim": px.pid}}
        if "litellm" in names:
            venv = Path(args.litellm_venv)
            if not (venv / "bin" / "litellm").exists():
                raise SystemExit(f"no LiteLLM at {venv}: run bench/overhead/setup.sh")
            p, key = litellm(static_root, sim_root, venv)
            procs.append(p)
            T["litellm"] = {"static": f"http://127.0.0.1:{p.port}", "sim": f"http://127.0.0.1:{p.port}",
                            "headers": [["authorization", f"Bearer {key}"]],
                            "pids": {"static": p.pid, "sim": p.pid}}
        names = [n for n in names if n in T]

        cores: dict[str, dict[str, list[float]]] = {n: {"sat": [], "streams": []} for n in names}

        def run(n: str, kind: str, phase: str | None = None, **kw: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
            t = T[n]
            model = "static-chat" if kind == "static" else "sim-chat"
            pid = t.get("pids", {}).get(kind)
            c0, w0 = (h.cpu_seconds(pid) if pid and phase else 0.0), time.monotonic()
            out = gen(t[kind] + PATH, model, t["headers"], **kw)
            if pid and phase:
                # CPU the proxy used, in cores (1.0 = one core for the whole run).
                cores[n][phase].append((h.cpu_seconds(pid) - c0) / (time.monotonic() - w0))
            return out

        # Warm every path (connection pools, JIT-free but cache-warm), and check it answers.
        for n in names:
            recs, _ = run(n, "static", mode="closed", concurrency=4, duration_s=1.0, grace_s=10)
            if not ok(recs):
                raise RuntimeError(f"{n}: no successful request in warm-up: {recs[:1]}")
            recs, _ = run(n, "sim", mode="closed", concurrency=2, duration_s=0.5, grace_s=10,
                          stream=True, max_tokens=2)
            if not ok(recs):
                raise RuntimeError(f"{n}: no successful stream in warm-up: {recs[:1]}")
        h.log(f"paths up: {', '.join(names)}")

        sat: dict[str, list[float]] = {n: [] for n in names}
        errs: dict[str, int] = {n: 0 for n in names}
        c1: dict[str, list[float]] = {n: [] for n in names}
        rate: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        wrk: dict[str, list[float]] = {n: [] for n in names}
        for rnd in range(args.rounds):
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            for n in order:
                recs, summ = run(n, "static", "sat", mode="closed", concurrency=args.sat_conns,
                                 duration_s=args.sat_s, grace_s=30)
                good = ok(recs)
                errs[n] += len(recs) - len(good)
                sat[n].append(len(good) / summ["elapsed_s"])
                recs, _ = run(n, "static", mode="closed", concurrency=1, duration_s=args.lat_s, grace_s=30)
                c1[n].extend(a["total"] for a in ok(recs))
                recs, _ = run(n, "static", mode="open", rate=args.rate, duration_s=args.lat_s, grace_s=30)
                rate[n].extend(recs)
                if args.wrk:
                    w = wrk_rps(T[n]["static"] + PATH, "static-chat", T[n]["headers"], args.sat_conns, args.sat_s)
                    if w is not None:
                        wrk[n].append(w)
                h.log(f"round {rnd+1} {n}: {sat[n][-1]:.0f} req/s, c=1 p50 {h.pct(c1[n], 50):.2f} ms")

        streams: dict[str, dict[str, Any]] = {}
        for n in names:
            spy = None
            if args.profile and n in TIERQ_CLIENTS:
                spy = h.pyspy_start(T[n]["pid"], int(args.stream_s), h.TMP / f"pyspy-{n}-streams.raw", "gil")
            recs, summ = run(n, "sim", "streams", mode="closed", concurrency=args.streams, ramp_s=1.0,
                             duration_s=args.stream_s, grace_s=args.stream_tokens / args.stream_tokens_per_s + 20,
                             stream=True, max_tokens=args.stream_tokens, gaps=True,
                             max_requests=args.streams * 4)
            good = ok(recs)
            gaps = [g for a in good for g in a.get("gaps", [])]
            full = [a for a in good if a["events"] >= args.stream_tokens + 2]
            streams[n] = {"started": len(recs), "ok": len(good), "complete": len(full),
                          "gap_p50": h.pct(gaps, 50), "gap_p99": h.pct(gaps, 99), "gap_max": max(gaps, default=float("nan")),
                          "ttft_p99": h.pct([a["ttft"] for a in good if "ttft" in a], 99),
                          "errors": len(recs) - len(good)}
            h.log(f"streams {n}: {streams[n]}")
            if spy is not None:
                spy.wait(60)

        profile: dict[str, str] = {}
        if args.profile:
            profile = run_profile(T, args)
            for n in TIERQ_CLIENTS:
                if n not in T:
                    continue
                name = h.pyspy_summary(h.TMP / f"pyspy-{n}-streams.raw",
                                       f"{n} (client {TIERQ_CLIENTS[n]}) holding {args.streams} streams at "
                                       f"{args.stream_tokens_per_s:g} tokens/s, py-spy --gil",
                                       h.RESULTS / f"{args.name}-{n}-pyspy-streams-gil.txt")
                if name:
                    profile[f"{n}, {args.streams} streams --gil"] = name
    finally:
        h.stop_all(reversed(procs))

    res["load_end"] = [round(x, 2) for x in os.getloadavg()]
    res["sat_rps"] = sat
    res["proxy_cores"] = cores
    res["sat_errors"] = errs
    res["wrk_rps"] = wrk
    res["c1"] = {n: {"p50": h.pct(v, 50), "p99": h.pct(v, 99), "n": len(v)} for n, v in c1.items()}
    res["rate"] = {n: {"p50": h.pct([a["total"] for a in ok(v)], 50),
                       "p99": h.pct([a["total"] for a in ok(v)], 99),
                       "n": len(v), "ok": len(ok(v)),
                       "late_p99": h.pct([r["late"] for r in v], 99)} for n, v in rate.items()}
    res["streams"] = streams
    res["profile"] = profile
    h.RESULTS.mkdir(exist_ok=True)
    (h.RESULTS / f"{args.name}.json").write_text(json.dumps(res, indent=1, default=str))
    sys.path.insert(0, str(HERE))
    from report import write_report  # noqa: E402
    write_report(res, args.name)


def run_profile(T: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, str]:
    """py-spy on tierq on each client (and the forwarder) while saturated: plain (every
    thread), --gil (the thread holding the GIL: where a Python process's one core goes)
    and --native (C and Rust frames too). Returns {label: file name}."""
    out: dict[str, str] = {}
    secs = max(3, int(args.sat_s))
    for n, mode in (("tierq", ""), ("tierq", "gil"), ("tierq", "native"),
                    ("tierq-core", ""), ("tierq-core", "gil"), ("tierq-core", "native"), ("forwarder", "gil")):
        if n not in T:
            continue
        raw = h.TMP / f"pyspy-{n}-{mode or 'plain'}.raw"
        spy = h.pyspy_start(T[n]["pids"]["static"], secs, raw, mode)
        if spy is None:
            return out
        gen(T[n]["static"] + PATH, "static-chat", T[n]["headers"], mode="closed",
            concurrency=args.sat_conns, duration_s=secs + 1, grace_s=30)
        spy.wait(60)
        suffix = f"-{mode}" if mode else ""
        name = h.pyspy_summary(raw, f"{n} saturated by {args.sat_conns} connections (static backend)"
                               f"{', py-spy --' + mode if mode else ''}",
                               h.RESULTS / f"{args.name}-{n}-pyspy{suffix}.txt")
        if name:
            out[f"{n}{' --' + mode if mode else ''}"] = name
    return out


if __name__ == "__main__":
    main()
