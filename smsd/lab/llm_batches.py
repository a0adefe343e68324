"""The local server's Batch API: ``/v1/files`` and ``/v1/batches``, offline.

It copies what OpenAI's Batch API does, so that smsd's batch mode can be
tested and demonstrated without paying: a JSONL input file of chat-completion
requests is uploaded (``purpose="batch"``), a batch is created on it, moves
``validating`` → ``in_progress`` → ``completed`` after ``delay_s``, and then
has an output file (one line per answered request, ``custom_id`` kept) and an
error file (one line per failed request).

Behaviour switches (``POST /_admin/batches``, or ``LlmServer.batches.configure``):

- ``delay_s``: seconds from ``create`` until the batch is complete;
- ``fail_ratio``: share of lines answered with a per-line error (seeded);
- ``expire``: the batch ends ``expired``; only the first ``expire_answered``
  share of its lines has an answer;
- ``unknown_ids``: each answer also carries a result for an id nobody asked;
- ``seed``.

Every answered line counts in the server's ``asked``/``billed`` counters like
an online call, and ``GET /_admin/batches`` tells how many batches were
created (the tests' "exactly one batch per SMS set").  Nothing logs SMS text.
"""
from __future__ import annotations

import json
import random
import threading
import time
import uuid
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any, Callable

#: What the switches are when nothing was configured.
DEFAULT_BATCH_SETTINGS = {"delay_s": 0.0, "fail_ratio": 0.0, "expire": False,
                          "expire_answered": 0.5, "unknown_ids": False, "seed": 0}
FINAL = ("completed", "failed", "expired", "cancelled")


class BatchError(Exception):
    """An HTTP error answer of the files/batches API."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": "invalid_request_error",
                               "param": None, "code": code}}


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """``multipart/form-data`` fields: name -> (filename, bytes)."""
    if not content_type.startswith("multipart/form-data"):
        raise BatchError(400, "expected multipart/form-data")
    msg = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


class Batches:
    """Files and batches of one server; thread-safe.

    ``answer(body) -> (status, response body)`` runs one chat-completion
    request the way the online endpoint would (the server passes its own).
    """

    def __init__(self, answer: Callable[[dict], tuple[int, dict]]) -> None:
        self._answer = answer
        self.lock = threading.Lock()
        self.settings = dict(DEFAULT_BATCH_SETTINGS)
        self.files: dict[str, dict] = {}
        self.batches: dict[str, dict] = {}
        self.created = 0

    # -- admin
    def configure(self, changes: dict) -> dict:
        with self.lock:
            for key, value in changes.items():
                if key not in DEFAULT_BATCH_SETTINGS:
                    raise ValueError(f"unknown batch setting {key!r}")
                kind = type(DEFAULT_BATCH_SETTINGS[key])
                self.settings[key] = bool(value) if kind is bool else kind(value)
            return dict(self.settings)

    def stats(self) -> dict:
        with self.lock:
            return {"created": self.created, "settings": dict(self.settings),
                    "batches": [{k: b[k] for k in ("id", "status", "input_file_id", "metadata")}
                                | {"lines": b["n_lines"]} for b in self.batches.values()]}

    def reset(self) -> None:
        with self.lock:
            self.files.clear()
            self.batches.clear()
            self.created = 0
            self.settings = dict(DEFAULT_BATCH_SETTINGS)

    # -- files
    def upload(self, content_type: str, body: bytes) -> dict:
        fields = parse_multipart(content_type, body)
        purpose = fields.get("purpose", (None, b""))[1].decode()
        if "file" not in fields:
            raise BatchError(400, "missing file")
        filename, data = fields["file"]
        return self._new_file(data, filename or "upload.jsonl", purpose or "batch")

    def _new_file(self, data: bytes, filename: str, purpose: str) -> dict:
        file_id = "file-" + uuid.uuid4().hex[:24]
        meta = {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                "filename": filename, "purpose": purpose, "status": "processed"}
        with self.lock:
            self.files[file_id] = dict(meta, data=data)
        return meta

    def file(self, file_id: str, content: bool = False) -> Any:
        with self.lock:
            f = self.files.get(file_id)
        if f is None:
            raise BatchError(404, f"No such File object: {file_id}")
        return f["data"] if content else {k: v for k, v in f.items() if k != "data"}

    # -- batches
    def create(self, body: dict) -> dict:
        file_id = body.get("input_file_id")
        with self.lock:
            f = self.files.get(file_id)
        if f is None:
            raise BatchError(400, f"input_file_id {file_id!r} not found")
        if body.get("endpoint") != "/v1/chat/completions":
            raise BatchError(400, "only /v1/chat/completions is supported")
        if body.get("completion_window") != "24h":
            raise BatchError(400, "completion_window must be 24h")
        lines = [json.loads(line) for line in f["data"].splitlines() if line.strip()]
        if not lines or any(not isinstance(x, dict) or "custom_id" not in x for x in lines):
            raise BatchError(400, "input file is not JSONL of requests with custom_id")
        now = time.time()
        batch = {"id": "batch_" + uuid.uuid4().hex[:24], "object": "batch",
                 "endpoint": body["endpoint"], "input_file_id": file_id,
                 "completion_window": "24h", "status": "validating", "output_file_id": None,
                 "error_file_id": None, "created_at": int(now), "metadata": body.get("metadata") or {},
                 "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
                 "errors": None, "n_lines": len(lines), "_lines": lines, "_t0": now}
        with self.lock:
            self.batches[batch["id"]] = batch
            self.created += 1
        return self._public(batch)

    def retrieve(self, batch_id: str) -> dict:
        return self._public(self._advance(self._get(batch_id)))

    def cancel(self, batch_id: str) -> dict:
        batch = self._advance(self._get(batch_id))
        with self.lock:
            if batch["status"] not in FINAL:
                batch["status"] = "cancelled"
                batch["cancelled_at"] = int(time.time())
        return self._public(batch)

    def list(self, after: str | None, limit: int) -> dict:
        with self.lock:
            ids = sorted(self.batches, key=lambda i: (self.batches[i]["_t0"], i), reverse=True)
        if after in ids:
            ids = ids[ids.index(after) + 1:]
        page = ids[:limit]
        data = [self.retrieve(i) for i in page]
        return {"object": "list", "data": data, "first_id": page[0] if page else None,
                "last_id": page[-1] if page else None, "has_more": len(ids) > len(page)}

    def _get(self, batch_id: str) -> dict:
        with self.lock:
            batch = self.batches.get(batch_id)
        if batch is None:
            raise BatchError(404, f"No such Batch object: {batch_id}")
        return batch

    @staticmethod
    def _public(batch: dict) -> dict:
        return {k: v for k, v in batch.items() if not k.startswith("_") and k != "n_lines"}

    def _advance(self, batch: dict) -> dict:
        """Move a batch on by the clock: in_progress, then its final state and files."""
        with self.lock:
            if batch["status"] in FINAL:
                return batch
            settings = dict(self.settings)
            elapsed = time.time() - batch["_t0"]
            if elapsed < settings["delay_s"]:
                batch["status"] = "in_progress" if elapsed > settings["delay_s"] / 2 else "validating"
                return batch
            batch["status"] = "finalizing"
        self._run(batch, settings)
        return batch

    def _run(self, batch: dict, settings: dict) -> None:
        rng = random.Random(f"{settings['seed']}:{batch['id']}")
        lines = batch["_lines"]
        answered = len(lines)
        if settings["expire"]:
            answered = int(len(lines) * settings["expire_answered"])
        out, err = [], []
        for n, line in enumerate(lines):
            if n >= answered:
                continue   # expired before this line ran: neither output nor error
            rid = "req_" + uuid.uuid4().hex
            if rng.random() < settings["fail_ratio"]:
                err.append({"id": "batch_req_" + uuid.uuid4().hex[:16], "custom_id": line["custom_id"],
                            "response": None,
                            "error": {"code": "server_error", "message": "line failed (injected)"}})
                continue
            status, body = self._answer(line.get("body") or {})
            if status == 200 and settings["unknown_ids"]:
                content = json.loads(body["choices"][0]["message"]["content"])
                content["results"].append({"id": "not-asked", "kind": "other", "transactions": []})
                body["choices"][0]["message"]["content"] = json.dumps(content)
            out.append({"id": "batch_req_" + uuid.uuid4().hex[:16], "custom_id": line["custom_id"],
                        "response": {"status_code": status, "request_id": rid, "body": body},
                        "error": None})
        jsonl = lambda rows: "".join(json.dumps(r) + "\n" for r in rows).encode()  # noqa: E731
        output = self._new_file(jsonl(out), f"{batch['id']}_output.jsonl", "batch_output") if out else None
        errors = self._new_file(jsonl(err), f"{batch['id']}_error.jsonl", "batch_output") if err else None
        with self.lock:
            batch["output_file_id"] = output["id"] if output else None
            batch["error_file_id"] = errors["id"] if errors else None
            batch["request_counts"] = {"total": len(lines), "completed": len(out), "failed": len(err)}
            batch["status"] = "expired" if settings["expire"] else "completed"
            batch["completed_at"] = int(time.time())


def route(batches: Batches, method: str, path: str, query: dict, headers: Any,
          read_body: Callable[[], bytes]) -> tuple[int, Any, str]:
    """Serve one files/batches request: (status, JSON object or bytes, content type)."""
    parts = [p for p in path.split("/") if p][1:]   # drop "v1"
    try:
        if parts[:1] == ["files"]:
            if method == "POST" and len(parts) == 1:
                return 200, batches.upload(headers.get("Content-Type") or "", read_body()), "json"
            if method == "GET" and len(parts) == 3 and parts[2] == "content":
                return 200, batches.file(parts[1], content=True), "bytes"
            if method == "GET" and len(parts) == 2:
                return 200, batches.file(parts[1]), "json"
        if parts[:1] == ["batches"]:
            if method == "POST" and len(parts) == 1:
                body = json.loads(read_body() or b"{}")
                return 200, batches.create(body if isinstance(body, dict) else {}), "json"
            if method == "GET" and len(parts) == 1:
                limit = max(1, min(100, int(query.get("limit", 20))))
                return 200, batches.list(query.get("after"), limit), "json"
            if method == "GET" and len(parts) == 2:
                return 200, batches.retrieve(parts[1]), "json"
            if method == "POST" and len(parts) == 3 and parts[2] == "cancel":
                read_body()
                return 200, batches.cancel(parts[1]), "json"
        raise BatchError(404, "not found", "not_found")
    except BatchError as exc:
        return exc.status, exc.body, "json"
    except (ValueError, KeyError, TypeError) as exc:
        return 400, BatchError(400, f"bad request: {exc.__class__.__name__}").body, "json"
