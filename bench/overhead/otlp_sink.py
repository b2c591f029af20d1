"""An OTLP/HTTP trace receiver for bench/overhead/tracing.py: decodes every
ExportTraceServiceRequest it is sent (opentelemetry-proto) and counts the spans,
so the run can check the gateway's spans arrived. GET /count: per service.name,
{"posts", "spans", "requests"} (a request's own span is its SERVER one).

    python otlp_sink.py PORT
"""

from __future__ import annotations

import sys

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

COUNTS: dict[str, dict[str, int]] = {}


async def traces(request: web.Request) -> web.Response:
    req = ExportTraceServiceRequest()
    req.ParseFromString(await request.read())
    for rs in req.resource_spans:
        name = next((a.value.string_value for a in rs.resource.attributes
                     if a.key == "service.name"), "")
        c = COUNTS.setdefault(name, {"posts": 0, "spans": 0, "requests": 0})
        c["posts"] += 1
        for ss in rs.scope_spans:
            c["spans"] += len(ss.spans)
            c["requests"] += sum(1 for s in ss.spans if s.kind == 2)
    return web.Response(body=b"", content_type="application/x-protobuf")


async def count(request: web.Request) -> web.Response:
    return web.json_response(COUNTS)


def main() -> None:
    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/count", count)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)


if __name__ == "__main__":
    main()
