"""The local LLM server's state: counters, fault settings, the fault script and dice.

:class:`State` is shared by every handler thread: it counts calls (per SMS id,
billed, tokens), holds the fault settings (:data:`DEFAULT_FAULTS`, changed live
through the admin API) and the deterministic script of faults for the next
calls, and decides each call's fault; :func:`_mangle` applies a content fault
(malformed, partial, bad item, unknown id) to an answer.  Apart from
:mod:`smsd.lab.llmserver` because deciding faults and counting is independent
of the HTTP plumbing that serves them.
"""
from __future__ import annotations

import collections
import json
import random
import threading
import time
import uuid
from typing import Any

from .llm_extractors import Extractor

#: Fault settings and their defaults.  Every one can be given at start
#: (``LlmServer(**faults)`` / CLI flags) and changed live (``POST /_admin/faults``).
DEFAULT_FAULTS: dict[str, Any] = {
    "latency_ms": 0.0,          # fixed latency added to every answered call
    "latency_jitter_ms": 0.0,   # plus uniform(0, jitter)
    "p_429": 0.0,               # probability of a 429 (with Retry-After)
    "p_500": 0.0,               # probability of a 500
    "p_timeout": 0.0,           # probability of sleeping timeout_sleep_s before answering
    "p_malformed": 0.0,         # probability of content that is not JSON
    "p_partial": 0.0,           # probability of dropping some results (and maybe adding an unknown id)
    "p_bad_item": 0.0,          # probability of one invalid result item
    "timeout_sleep_s": 30.0,    # how long a "timeout" call sleeps (longer than the client timeout)
    "retry_after_s": 1.0,       # Retry-After of 429/503 answers
    "rpm_limit": 0,             # requests per minute; beyond it -> 429 (0 = no limit)
    "seed": None,               # seed of the fault dice (None = random)
    # Server dialects, for the wire-format paths of smsd/wireformat.py:
    "reject_json_schema": False,  # 500 "Input should be 'text' or 'json_object'" (llama-cpp-python)
    "reject_pattern": False,      # 500 when a response_format schema holds a "pattern" (grammar engines)
    "reject_response_format": False,  # 400 "response_format is not supported" for any response_format
    "token_param": "both",        # which cap the server reads: both | max_tokens | max_completion_tokens | none
    "truncate_chars": 0,          # cut every answer after N characters, finish_reason "length" (0 = off)
    "strict_model": False,        # 404 "model does not exist" for any model but --model
}
#: Dialect settings that are not numbers.
_BOOLS = ("reject_json_schema", "reject_pattern", "reject_response_format", "strict_model")
TOKEN_PARAM_CHOICES = ("both", "max_tokens", "max_completion_tokens", "none")

#: Order in which random faults are drawn (one die, cumulative probabilities).
_RANDOM_FAULTS = (("429", "p_429"), ("500", "p_500"), ("timeout", "p_timeout"),
                  ("malformed", "p_malformed"), ("partial", "p_partial"),
                  ("bad_item", "p_bad_item"))

SCRIPT_FAULTS = ("ok", "429", "500", "503", "400", "401", "403", "404", "too_long", "timeout", "close",
                 "malformed", "partial", "bad_item", "unknown")


class State:
    """Counters, fault settings and the script; shared by all handler threads."""

    def __init__(self, extractor: Extractor, faults: dict | None = None,
                 api_key: str | None = None, model: str = "smsd-local", tokens: str = "bpe",
                 prefix_cache: bool = False):
        self.extractor = extractor
        self.tokens = tokens                  # "bpe" (smsd.tokens) or "estimate" (chars/4)
        self.prefix_cache = prefix_cache
        self.api_key = api_key
        self.model = model
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.start_faults = self._checked(dict(DEFAULT_FAULTS), faults or {})
        self.faults = dict(self.start_faults)
        self.rng = random.Random(self.faults["seed"])
        self._reset_counters()

    # -- settings
    @staticmethod
    def _checked(base: dict, changes: dict) -> dict:
        for key, value in changes.items():
            if key not in DEFAULT_FAULTS:
                raise ValueError(f"unknown fault setting {key!r}")
            if key in _BOOLS:
                if not isinstance(value, (bool, int)) and value not in ("true", "false", "1", "0"):
                    raise ValueError(f"{key} must be true or false")
                base[key] = value in (True, 1, "true", "1")
            elif key == "token_param":
                if value not in TOKEN_PARAM_CHOICES:
                    raise ValueError(f"token_param must be one of {', '.join(TOKEN_PARAM_CHOICES)}")
                base[key] = value
            elif key == "seed":
                base[key] = None if value is None else int(value)
            elif key in ("rpm_limit", "truncate_chars"):
                base[key] = int(value or 0)
            else:
                value = float(value)
                if key.startswith("p_") and not 0.0 <= value <= 1.0:
                    raise ValueError(f"{key} must be within [0, 1]")
                if value < 0:
                    raise ValueError(f"{key} must be >= 0")
                base[key] = value
        if sum(base[p] for _, p in _RANDOM_FAULTS) > 1.0 + 1e-9:
            raise ValueError("fault probabilities add up to more than 1")
        return base

    def set_faults(self, changes: dict) -> dict:
        with self.lock:
            self.faults = self._checked(dict(self.faults), changes)
            if "seed" in changes:
                self.rng = random.Random(self.faults["seed"])
            return dict(self.faults)

    def set_script(self, entries: list) -> int:
        bad = [e for e in entries if str(e) not in SCRIPT_FAULTS]
        if bad:
            raise ValueError(f"unknown script entries {bad!r}; use {', '.join(SCRIPT_FAULTS)}")
        with self.lock:
            self.script = collections.deque(str(e) for e in entries)
            return len(self.script)

    def _reset_counters(self) -> None:
        self.generation = getattr(self, "generation", 0) + 1  # a late (timed-out) call of an older
        self.calls = 0                                         # generation adds no tokens after a reset
        self.asked: collections.Counter = collections.Counter()
        self.billed: collections.Counter = collections.Counter()
        self.fault_counts: collections.Counter = collections.Counter()
        self.call_times: list[float] = []
        # {"slot", "arrived"} (time.monotonic) of each request that named its rate-limit slot.
        self.slots: list[dict] = []
        # One per answered completion: when its last byte was written (wall clock), so an
        # outside harness can time answer -> journal commit per request id.
        self.responses: list[dict] = []
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.usage_log: list[dict] = []       # per answered call: SMS keys and tokens billed
        self.prefixes: set = set()            # prompt prefixes seen (prefix_cache)
        self.rejected_429 = 0
        self.window: collections.deque = collections.deque()  # accepted call times for rpm_limit
        self.script: collections.deque = collections.deque()
        self.last_request: dict = {}

    def reset(self, faults: bool = False) -> None:
        with self.lock:
            self._reset_counters()
            if faults:
                self.faults = dict(self.start_faults)
                self.rng = random.Random(self.faults["seed"])

    def stats(self) -> dict:
        with self.lock:
            return {
                "calls": self.calls,
                "asked": dict(self.asked),
                "billed": dict(self.billed),
                "faults": dict(self.fault_counts),
                "call_times": list(self.call_times),
                "slots": [dict(s) for s in self.slots],
                "responses": list(self.responses),
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "cached_tokens": self.cached_tokens,
                "usage_log": [dict(u) for u in self.usage_log],
                "rejected_429": self.rejected_429,
                "script_left": len(self.script),
            }

    # -- one completion call
    def admit(self, ids: list[str], shape: dict) -> tuple[str, dict, int]:
        """Count the call and decide its fault; returns (fault, settings snapshot, generation)."""
        now = time.time()
        with self.lock:
            gen = self.generation
            self.calls += 1
            self.call_times.append(now)
            self.asked.update(ids)
            self.last_request = shape
            faults = dict(self.faults)
            limit = faults["rpm_limit"]
            if limit:
                while self.window and self.window[0] <= now - 60.0:
                    self.window.popleft()
                if len(self.window) >= limit:
                    self.rejected_429 += 1
                    return "rpm_429", faults, gen
                self.window.append(now)
            if self.script:
                fault = self.script.popleft()
            else:
                fault = "ok"
                die = self.rng.random()
                edge = 0.0
                for name, key in _RANDOM_FAULTS:
                    edge += faults[key]
                    if die < edge:
                        fault = name
                        break
            if fault != "ok":
                self.fault_counts[fault] += 1
            if fault in ("ok", "timeout", "malformed", "partial", "bad_item", "unknown"):
                self.billed.update(ids)  # the "model" ran on these: a paid call
            return fault, faults, gen

    def note_slot(self, header: str | None, arrived: float) -> None:
        """Record a request's rate-limit slot (its ``X-Smsd-Slot``) and when it arrived."""
        try:
            slot = float(header) if header else None
        except ValueError:
            slot = None
        if slot is not None:
            with self.lock:
                self.slots.append({"slot": slot, "arrived": arrived})

    def note_response(self, request_id: str, n_sms: int, written_at: float, generation: int) -> None:
        """Record that the answer ``request_id`` was written completely at ``written_at``."""
        with self.lock:
            if generation == self.generation:
                self.responses.append({"request_id": request_id, "n_sms": n_sms,
                                       "written_at": written_at})

    def refuse(self, kind: str, shape: dict) -> None:
        """Count a call that the server's dialect refused (never billed)."""
        with self.lock:
            self.calls += 1
            self.call_times.append(time.time())
            self.fault_counts[kind] += 1
            self.last_request = shape

    def add_tokens(self, prompt: int, completion: int, generation: int, *, cached: int = 0,
                   keys: list[str] | None = None) -> None:
        with self.lock:
            if generation != self.generation:
                return
            self.prompt_tokens += prompt
            self.completion_tokens += completion
            self.cached_tokens += cached
            self.usage_log.append({"keys": list(keys or ()), "prompt_tokens": prompt,
                                   "cached_tokens": cached, "completion_tokens": completion})

    def dice(self) -> random.Random:
        """A private RNG for one call, seeded from the shared one (reproducible under a seed)."""
        with self.lock:
            return random.Random(self.rng.getrandbits(64))


def _mangle(fault: str, results: list[dict], rng: random.Random) -> tuple[str, list[str]]:
    """Apply a content fault; returns (content, ids touched)."""
    if fault == "malformed":
        variants = [
            lambda: json.dumps({"results": results})[: max(1, len(json.dumps({"results": results})) // 2)],
            lambda: "I'm sorry, I could not read these messages.",
            lambda: "",
            lambda: "{results: [}",
        ]
        return rng.choice(variants)(), []
    touched: list[str] = []
    if fault == "partial":
        if results:
            k = rng.randint(1, len(results))
            dropped = rng.sample(range(len(results)), k)
            touched = [results[i]["id"] for i in sorted(dropped)]
            results = [r for i, r in enumerate(results) if i not in set(dropped)]
        if rng.random() < 0.5:
            extra = "unknown-" + uuid.uuid4().hex[:8]
            results = results + [{"id": extra, "kind": "other", "transactions": []}]
            touched.append(extra)
    elif fault == "unknown":
        extra = "unknown-" + uuid.uuid4().hex[:8]
        results = results + [{"id": extra, "kind": "other", "transactions": []}]
        touched.append(extra)
    elif fault == "bad_item" and results:
        with_txn = [r for r in results if r["transactions"]]
        victim = rng.choice(with_txn or results)
        touched.append(victim["id"])
        if victim["transactions"]:
            txn = victim["transactions"][0]
            how = rng.choice(["separator", "missing_amount", "direction", "number"])
            if how == "separator":
                txn["amount"] = "1,234.00"
            elif how == "missing_amount":
                txn.pop("amount", None)
            elif how == "direction":
                txn["direction"] = "sideways"
            else:
                txn["amount"] = 1234.5
        else:
            victim.pop("kind", None)
    # Compact, as models write structured output: no spaces after separators.
    return json.dumps({"results": results}, ensure_ascii=False, separators=(",", ":")), touched
