"""KServe's gRPC inference service, ``inference.GRPCInferenceService``, behind the gateway's public gRPC port.

    client --gRPC--> gateway (nginx, public gRPC port: credential, failure limit, body limit)
           --> run/grpc.sock (this process) --REST v2, binary tensor data--> gateway's inference port
           --> replicas --> handler/v2.py

Each call is turned into the REST v2 request that means the same and sent to the gateway's own
inference port with the caller's credential (the ``authorization`` metadata) and request id, so
the answer, the limits, the retries across replicas and the errors are exactly those of REST;
the HTTP status becomes the gRPC status (a client's error is INVALID_ARGUMENT, NOT_FOUND,
UNAUTHENTICATED or RESOURCE_EXHAUSTED, never INTERNAL or UNAVAILABLE). An image travels as the
file itself both ways: gRPC's ``raw_input_contents`` (tritonclient) or ``bytes_contents``
(kserve) becomes a length-prefixed BYTES tensor of the binary extension, and the binary outputs
come back as ``raw_output_contents``.

The message classes are the generated ones ``tritonclient`` publishes (Triton's
grpc_service.proto: package ``inference``, service ``GRPCInferenceService``, whose KServe part,
the six calls served here, is KServe's grpc_predict_v2.proto message for message and field for
field; the integration tests call it with kserve's own client too). Any other call answers
UNIMPLEMENTED; bytes that are not the call's message, INVALID_ARGUMENT.

    python -m scripts.deploy.grpc_service --socket run/grpc.sock --upstream http://127.0.0.1:8080

The supervisor (scripts/deploy/supervisor.py) starts it, and restarts it when it dies.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import re
import signal
import struct
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote, urlsplit

log = logging.getLogger("grpc_service")
NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")  # what the gateway's v2 routes accept as a model name or version


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--socket", type=Path, required=True, help="the Unix socket the gateway's gRPC port proxies to")
    p.add_argument("--upstream", required=True, help="the gateway's inference port, e.g. http://127.0.0.1:8080")
    p.add_argument("--max-message", type=int, default=10 * 2**20 + 2**16,
                   help="largest message taken, in bytes (the gateway's body limit applies first)")
    p.add_argument("--threads", type=int, default=32, help="calls handled at once (each waits on its REST request)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the REST answer")
    return p


# --- REST: the gateway's own inference port ----------------------------------------------------------
class Upstream:
    """Keep-alive HTTP/1.1 connections to the gateway's inference port, one per thread."""

    def __init__(self, base: str, timeout: float):
        parts = urlsplit(base)
        self.host, self.port, self.timeout = parts.hostname or "127.0.0.1", parts.port or 80, timeout
        self.local = threading.local()

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        for _ in range(2):
            conn = getattr(self.local, "conn", None)
            reused = conn is not None
            if conn is None:
                conn = self.local.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                conn.request(method, path, body=body, headers=headers or {})
                resp = conn.getresponse()
                data = resp.read()
                return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
            except (http.client.HTTPException, OSError) as exc:
                conn.close()
                self.local.conn = None
                # A keep-alive connection the gateway closed while idle is tried once more on a new one
                # (predictions are idempotent); a timeout or a new connection's failure is the answer.
                if not reused or isinstance(exc, TimeoutError):
                    raise
        raise ConnectionError("unreachable")


# --- HTTP status -> gRPC status ----------------------------------------------------------------------
def grpc_code(status: int):
    import grpc

    codes = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
             403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
             405: grpc.StatusCode.UNIMPLEMENTED, 408: grpc.StatusCode.DEADLINE_EXCEEDED,
             413: grpc.StatusCode.INVALID_ARGUMENT, 415: grpc.StatusCode.INVALID_ARGUMENT,
             429: grpc.StatusCode.RESOURCE_EXHAUSTED, 500: grpc.StatusCode.INTERNAL,
             502: grpc.StatusCode.UNAVAILABLE, 503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}
    if status in codes:
        return codes[status]
    return grpc.StatusCode.INVALID_ARGUMENT if 400 <= status < 500 else grpc.StatusCode.UNAVAILABLE


def error_message(status: int, body: bytes) -> str:
    try:
        doc = json.loads(body)
        text = doc.get("error") or doc.get("message") if isinstance(doc, dict) else None
    except ValueError:
        text = None
    return str(text or body[:300].decode("utf-8", "replace") or f"HTTP {status}")


def parameter(value) -> object:
    """An InferParameter's value as JSON."""
    kind = value.WhichOneof("parameter_choice")
    return getattr(value, kind) if kind else None


_CONTENTS = ("bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents",
             "fp32_contents", "fp64_contents")


def rest_request(request) -> tuple[bytes, int]:
    """A ModelInferRequest as the REST v2 binary tensor data extension: (body, JSON header length).

    Raises ValueError with a message for the client when the message cannot be one.
    """
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise ValueError(f"raw_input_contents holds {len(raw)} entries for {len(request.inputs)} inputs; "
                         "send one entry per input (or none, with each input's contents).")
    header: dict = {"parameters": {**{k: parameter(v) for k, v in request.parameters.items()},
                                   "binary_data_output": True}}
    if request.id:
        header["id"] = request.id
    inputs, chunks = [], []
    for i, tensor in enumerate(request.inputs):
        entry: dict = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        params = {k: parameter(v) for k, v in tensor.parameters.items() if k != "binary_data_size"}
        chunk = None
        if raw:
            chunk = raw[i]
        elif tensor.contents.bytes_contents or tensor.datatype == "BYTES":
            chunk = b"".join(struct.pack("<I", len(e)) + e for e in tensor.contents.bytes_contents)
        else:
            field = next((f for f in _CONTENTS if len(getattr(tensor.contents, f))), None)
            entry["data"] = list(getattr(tensor.contents, field)) if field else []
        if chunk is not None:
            params["binary_data_size"] = len(chunk)
            chunks.append(chunk)
        if params:
            entry["parameters"] = params
        inputs.append(entry)
    header["inputs"] = inputs
    if request.outputs:
        header["outputs"] = [{"name": o.name} for o in request.outputs]
    data = json.dumps(header).encode("utf-8")
    return data + b"".join(chunks), len(data)


def infer_response(pb, doc: dict, tail: bytes, model: str):
    """The REST v2 answer (its JSON header and binary part) as a ModelInferResponse with raw_output_contents."""
    from handler.v2 import encode_tensor

    resp = pb.ModelInferResponse(model_name=doc.get("model_name") or model, model_version=doc.get("model_version") or "",
                                 id=doc.get("id") or "")
    offset, raws = 0, []
    for out in doc.get("outputs", []):
        resp.outputs.add(name=out["name"], datatype=out["datatype"], shape=out["shape"])
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            raws.append(tail[offset:offset + size])
            offset += size
        else:
            raws.append(encode_tensor(out["datatype"], out.get("data", [])))
    resp.raw_output_contents.extend(raws)
    return resp


def build_handlers(upstream: Upstream):
    """The six calls of KServe's service, as a generic handler (any other call: UNIMPLEMENTED, from grpcio)."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb

    class Service:
        def _call(self, context, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                  ok: tuple[int, ...] = (200,)) -> tuple[int, dict, bytes]:
            meta = {k.lower(): v for k, v in context.invocation_metadata() if isinstance(v, str)}
            sent = {**(headers or {})}
            if "authorization" in meta:
                sent["Authorization"] = meta["authorization"]
            if "x-request-id" in meta:
                sent["X-Request-ID"] = meta["x-request-id"]
            try:
                status, got, data = upstream.request(method, path, body, sent)
            except TimeoutError:
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "The model did not answer in time; retry.")
            except (http.client.HTTPException, OSError) as exc:
                context.abort(grpc.StatusCode.UNAVAILABLE, f"The gateway did not answer ({type(exc).__name__}); retry.")
            if status not in ok:
                context.abort(grpc_code(status), error_message(status, data))
            return status, got, data

        @staticmethod
        def _model_path(context, name: str, version: str, suffix: str = "") -> str:
            if not name:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "The request names no model: set its name.")
            for what, value in (("model", name), ("version", version)):
                if value and not NAME.fullmatch(value):
                    context.abort(grpc.StatusCode.NOT_FOUND, f"No {what} {value[:60]!r} is served here.")
            return (f"/v2/models/{quote(name)}" + (f"/versions/{quote(version)}" if version else "") + suffix)

        def ServerLive(self, request, context):  # noqa: N802 - the proto's names
            self._call(context, "GET", "/v2/health/live")
            return pb.ServerLiveResponse(live=True)

        def ServerReady(self, request, context):  # noqa: N802
            status, _, _ = self._call(context, "GET", "/v2/health/ready", ok=(200, 503))
            return pb.ServerReadyResponse(ready=status == 200)

        def ModelReady(self, request, context):  # noqa: N802
            path = self._model_path(context, request.name, request.version, "/ready")
            status, _, _ = self._call(context, "GET", path, ok=(200, 503))
            return pb.ModelReadyResponse(ready=status == 200)

        def ServerMetadata(self, request, context):  # noqa: N802
            doc = json.loads(self._call(context, "GET", "/v2")[2])
            return pb.ServerMetadataResponse(name=doc["name"], version=doc["version"], extensions=doc["extensions"])

        def ModelMetadata(self, request, context):  # noqa: N802
            doc = json.loads(self._call(context, "GET", self._model_path(context, request.name, request.version))[2])
            tensors = lambda key: [pb.ModelMetadataResponse.TensorMetadata(  # noqa: E731
                name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in doc.get(key, [])]
            return pb.ModelMetadataResponse(name=doc["name"], versions=doc.get("versions", []),
                                            platform=doc.get("platform", ""), inputs=tensors("inputs"),
                                            outputs=tensors("outputs"))

        def ModelInfer(self, request, context):  # noqa: N802
            path = self._model_path(context, request.model_name, request.model_version, "/infer")
            try:
                body, length = rest_request(request)
            except ValueError as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            _, headers, data = self._call(context, "POST", path, body, {
                "Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(length)})
            length = int(headers.get("inference-header-content-length", len(data)))
            return infer_response(pb, json.loads(data[:length]), data[length:], request.model_name)

    service = Service()

    def handler(method: str, request_class):
        # Messages are parsed here rather than by grpcio, which answers bytes that are no message INTERNAL:
        # that is the client's error, INVALID_ARGUMENT.
        def call(data: bytes, context):
            try:
                request = request_class.FromString(data)
            except Exception as exc:  # protobuf's DecodeError, and whatever else unparseable bytes raise
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"The {method} message could not be read ({type(exc).__name__}): send a "
                              f"{request_class.DESCRIPTOR.full_name}.")
            return getattr(service, method)(request, context)

        return grpc.unary_unary_rpc_method_handler(call, request_deserializer=None,
                                                   response_serializer=lambda m: m.SerializeToString())

    calls = {"ServerLive": pb.ServerLiveRequest, "ServerReady": pb.ServerReadyRequest,
             "ModelReady": pb.ModelReadyRequest, "ServerMetadata": pb.ServerMetadataRequest,
             "ModelMetadata": pb.ModelMetadataRequest, "ModelInfer": pb.ModelInferRequest}
    return grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService", {name: handler(name, cls) for name, cls in calls.items()})


def main(args: argparse.Namespace) -> int:
    import grpc

    logging.basicConfig(level=logging.INFO, format="%(asctime)s grpc_service %(levelname)s %(message)s")
    server = grpc.server(ThreadPoolExecutor(max_workers=args.threads), options=[
        ("grpc.max_receive_message_length", args.max_message), ("grpc.max_send_message_length", args.max_message)])
    server.add_generic_rpc_handlers((build_handlers(Upstream(args.upstream, args.timeout)),))
    args.socket.unlink(missing_ok=True)
    server.add_insecure_port(f"unix:{args.socket}")
    server.start()
    args.socket.chmod(0o600)
    log.info("serving inference.GRPCInferenceService on unix:%s -> %s", args.socket, args.upstream)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=5).wait()
    args.socket.unlink(missing_ok=True)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
