"""Settings: ``config.toml`` first, then the environment on top.

Every setting has a default here, which ``config.toml`` at the top of the
repository documents.  A bad file or value stops start-up with a
:class:`ConfigError` that names the key, so an operator never has to guess.
"""
from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Mapping

from .metrics_http import ListenError, parse_listen
from .ledger import DEFAULT_PRICES, parse_prices, price_for


class ConfigError(Exception):
    """The configuration file or a value in it (or in the environment) is invalid."""


@dataclass
class MongoSettings:
    uri: str = "mongodb://127.0.0.1:27017"   # "embedded": smsd starts its own server
    db: str = "smsd"
    text_field: str = "body"
    sender_field: str = "sender"
    time_field: str = "received_at"
    timeout_ms: int = 5000
    embedded_path: str = ""                  # default: <state_dir>/embedded-mongo
    embedded_port: int = 27217


@dataclass
class LlmSettings:
    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4o-mini"
    api_key: str | None = field(default=None, repr=False)
    extractor: str = "llm"                   # llm | rules | rules-then-llm
    timeout: float = 60.0
    max_retries: int = 4
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    batch_size: int = 25                     # prompt tokens per SMS fall with it (docs/BENCHMARKS.md, cost)
    concurrency: int = 2
    requests_per_minute: float = 0.0         # 0: no limit
    tokens_per_minute: float = 0.0
    strict_schema: bool = False              # non-strict: fewer prompt and completion tokens
    response_format: str = "auto"            # auto | json_schema | json_object | prompt
    token_param: str = "auto"                # auto | max_completion_tokens | max_tokens
    completion_tokens_per_sms: int = 150     # completion-token cap per call: this per SMS ...
    completion_tokens_margin: int = 50       # ... plus this (0 per SMS: no cap)
    # USD per million prompt / completion tokens, decimal strings ("" = unknown): `smsd evaluate`.
    # USD per million prompt / completion tokens, decimal strings ("" = unknown): `smsd evaluate`,
    # smsd_llm_cost_usd_total.
    price_prompt_per_mtok: str = ""
    price_completion_per_mtok: str = ""
    short_ids: bool = True                   # ids "1".."N" local to a call instead of SMS keys
    answer_cache: bool = True                # shared answers of identical texts (smsd.answer_cache)
    key_header: bool = False                 # lab only: SMS keys in an X-Smsd-Keys header
    # USD per 1M tokens by model ([llm.prices."MODEL"]); defaults: smsd.ledger.DEFAULT_PRICES
    price_table: dict = field(default_factory=lambda: dict(DEFAULT_PRICES))
    mode: str = "online"                     # online | batch | auto (Batch API for big backlogs)
    batch_threshold: int = 1000              # auto: a backlog of at least this many SMS goes to a batch
    batch_max_sms: int = 50000               # SMS per batch job
    batch_poll_interval: float = 60.0        # longest wait between polls of an open batch, seconds

    def prices(self) -> tuple[Decimal, Decimal] | None:
        """USD per million prompt and completion tokens: ``price_*_per_mtok`` when both are
        set, else the model's entry in the price table, else None."""
        raw = (self.price_prompt_per_mtok, self.price_completion_per_mtok)
        if not all(raw):
            price = price_for(self.model, self.price_table)
            return None if price is None else (price.input, price.output)
        try:
            return Decimal(raw[0]), Decimal(raw[1])
        except InvalidOperation:
            return None


@dataclass
class JournalSettings:
    state_dir: str = "./var/state"
    synchronous: str = "FULL"
    background_sync: bool = True             # FULL: the WAL fsync in a thread, not in the commit (journal_sync)
    max_backlog: int = 2000                  # unflushed SMS results before LLM calls pause


@dataclass
class PipelineSettings:
    max_attempts: int = 3                    # per SMS, before quarantine
    max_text_chars: int = 2000
    page_size: int = 200
    worker_max_sms: int = 500                # per worker turn, for fairness between users
    trickle_group_max_users: int = 48        # small users one worker serves at once, calls filled across them; 1 = off
    trickle_group_calls: int = 4             # LLM calls' worth of SMS (llm.batch_size each) one group turn holds
    trickle_wait_ms: int = 1000              # how long a group turn's call waits for the other users' SMS
    flush_gather_sms: int = 200              # answered SMS gathered into one flush while calls are in flight; 1 = every answer
    flush_max_wait_ms: int = 1000            # the oldest gathered answer is flushed after this long; 0 = every answer
    group_write_wait_ms: int = 25            # how long a group member's flush write waits for the others'


@dataclass
class SupervisorSettings:
    runtime_dir: str = "./var/run"
    max_workers: int = 4
    discovery_interval: float = 5.0
    worker_timeout: float = 120.0
    worker_rss_limit_mb: int = 512           # recycled after its current turn
    drain_timeout: float = 30.0
    restart_backoff: float = 1.0
    restart_backoff_max: float = 60.0
    crash_loop_count: int = 5
    crash_loop_window: float = 300.0
    socket_group: str = ""
    allowed_uids: list[int] = field(default_factory=list)
    allowed_gids: list[int] = field(default_factory=list)
    log_file: str = ""
    log_level: str = "INFO"
    log_format: str = "text"                 # text | json (one JSON object per line)
    metrics_listen: str = ""                 # host:port of GET /metrics; "" = off


@dataclass
class LeaseSettings:
    ttl: float = 15.0                        # seconds a user's lease lasts unless renewed
    renew_fraction: float = 0.3              # renewed every ttl * renew_fraction seconds


@dataclass
class Settings:
    mongo: MongoSettings = field(default_factory=MongoSettings)
    llm: LlmSettings = field(default_factory=LlmSettings)
    journal: JournalSettings = field(default_factory=JournalSettings)
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)
    supervisor: SupervisorSettings = field(default_factory=SupervisorSettings)
    lease: LeaseSettings = field(default_factory=LeaseSettings)
    source: str = ""                         # the config file read, "" if none

    @property
    def state_dir(self) -> Path:
        return Path(self.journal.state_dir)

    @property
    def runtime_dir(self) -> Path:
        return Path(self.supervisor.runtime_dir)

    @property
    def control_socket(self) -> Path:
        return self.runtime_dir / "control.sock"

    def public(self) -> dict:
        """The settings as a dict, without secrets (for logs and status)."""
        out = dataclasses.asdict(self)
        out["llm"]["api_key"] = "***" if self.llm.api_key else None
        out["llm"]["price_table"] = {m: {k: str(v) for k, v in dataclasses.asdict(p).items()}
                                     for m, p in self.llm.price_table.items()}
        return out


# Environment variable -> (section, key).  The contract's names first.
ENV_OVERRIDES: dict[str, tuple[str, str]] = {
    "SMSD_MONGO_URI": ("mongo", "uri"),
    "SMSD_MONGO_DB": ("mongo", "db"),
    "SMSD_LLM_BASE_URL": ("llm", "base_url"),
    "SMSD_LLM_MODEL": ("llm", "model"),
    "OPENAI_API_KEY": ("llm", "api_key"),
    "SMSD_STATE_DIR": ("journal", "state_dir"),
    "SMSD_RUNTIME_DIR": ("supervisor", "runtime_dir"),
    # extensions
    "SMSD_EXTRACTOR": ("llm", "extractor"),
    "SMSD_MAX_WORKERS": ("supervisor", "max_workers"),
    "SMSD_LOG_LEVEL": ("supervisor", "log_level"),
    "SMSD_LOG_FORMAT": ("supervisor", "log_format"),
    "SMSD_METRICS_LISTEN": ("supervisor", "metrics_listen"),
    "SMSD_LLM_MODE": ("llm", "mode"),
}
# systemd's directories, used when the SMSD_ variables are not set.
SYSTEMD_DIRS = {"STATE_DIRECTORY": ("journal", "state_dir"),
                "RUNTIME_DIRECTORY": ("supervisor", "runtime_dir")}

CHOICES = {
    ("llm", "extractor"): ("llm", "rules", "rules-then-llm"),
    ("llm", "response_format"): ("auto", "json_schema", "json_object", "prompt"),
    ("llm", "token_param"): ("auto", "max_completion_tokens", "max_tokens"),
    ("llm", "mode"): ("online", "batch", "auto"),
    ("journal", "synchronous"): ("FULL", "NORMAL"),
    ("supervisor", "log_level"): ("DEBUG", "INFO", "WARNING", "ERROR"),
    ("supervisor", "log_format"): ("text", "json"),
}
POSITIVE = {("llm", "batch_size"), ("llm", "concurrency"), ("llm", "timeout"),
            ("journal", "max_backlog"), ("pipeline", "max_attempts"), ("pipeline", "page_size"),
            ("pipeline", "max_text_chars"), ("pipeline", "worker_max_sms"),
            ("pipeline", "trickle_group_max_users"), ("pipeline", "trickle_group_calls"),
            ("pipeline", "flush_gather_sms"),
            ("supervisor", "max_workers"), ("supervisor", "worker_timeout"),
            ("supervisor", "discovery_interval"), ("mongo", "timeout_ms"),
            ("llm", "batch_threshold"), ("llm", "batch_max_sms"), ("llm", "batch_poll_interval"), ("lease", "ttl")}


def default_config_path(env: Mapping[str, str]) -> Path | None:
    """``$SMSD_CONFIG``, else ``./config.toml`` or ``/etc/smsd/config.toml`` if present."""
    if env.get("SMSD_CONFIG"):
        return Path(env["SMSD_CONFIG"])
    for candidate in (Path("config.toml"), Path("/etc/smsd/config.toml")):
        if candidate.is_file():
            return candidate
    return None


def load_settings(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read settings from ``path`` (or the default location) and the environment.

    >>> s = load_settings(path=None, env={"SMSD_MONGO_DB": "x", "SMSD_CONFIG": "/dev/null"})
    >>> s.mongo.db
    'x'
    """
    env = os.environ if env is None else env
    path = Path(path) if path is not None else default_config_path(env)
    settings = Settings()
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        _apply_file(settings, raw, str(path))
        settings.source = str(path)
    for var, (section, key) in SYSTEMD_DIRS.items():
        if env.get(var):
            # systemd may pass several colon-separated directories; ours is the first.
            _set(settings, section, key, env[var].split(":")[0], f"${var}")
    credentials = env.get("CREDENTIALS_DIRECTORY")
    if credentials and (Path(credentials) / "openai_api_key").is_file():
        key = (Path(credentials) / "openai_api_key").read_text(encoding="utf-8").strip()
        _set(settings, "llm", "api_key", key, "credential openai_api_key")
    for var, (section, key) in ENV_OVERRIDES.items():
        if env.get(var):
            _set(settings, section, key, env[var], f"${var}")
    _validate(settings)
    return settings


def _apply_file(settings: Settings, raw: dict, where: str) -> None:
    for section, values in raw.items():
        target = getattr(settings, section, None)
        if not dataclasses.is_dataclass(target) or not isinstance(values, dict):
            raise ConfigError(f"{where}: unknown section [{section}]")
        for key, value in values.items():
            if key == "api_key":
                raise ConfigError(f"{where}: [llm] api_key must not be in the config file; "
                                  "use OPENAI_API_KEY or the openai_api_key credential")
            if (section, key) == ("llm", "prices"):
                try:
                    settings.llm.price_table = parse_prices(value, where)
                except ValueError as exc:
                    raise ConfigError(str(exc)) from None
                continue
            _set(settings, section, key, value, where)


def _set(settings: Settings, section: str, key: str, value: Any, where: str) -> None:
    target = getattr(settings, section)
    fields = {f.name: f for f in dataclasses.fields(target)}
    if key not in fields:
        raise ConfigError(f"{where}: unknown setting {section}.{key}")
    current = getattr(target, key)
    setattr(target, key, _coerce(current, fields[key], value, f"{section}.{key}", where))


def _coerce(current: Any, fld: dataclasses.Field, value: Any, name: str, where: str) -> Any:
    kind = fld.type if isinstance(fld.type, str) else getattr(fld.type, "__name__", str(fld.type))
    try:
        if "bool" in kind:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return value.lower() in ("1", "true", "yes", "on")
            raise ValueError("expected true or false")
        if kind == "int":
            if isinstance(value, bool) or isinstance(value, float):
                raise ValueError("expected a whole number")
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError("expected a number")
            return float(value)
        if kind.startswith("list"):
            if isinstance(value, str):
                value = [v for v in value.replace(",", " ").split() if v]
            if not isinstance(value, list):
                raise ValueError("expected a list of whole numbers")
            return [int(v) for v in value]
        if "str" in kind:
            if not isinstance(value, str):
                raise ValueError("expected a string")
            return value
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: bad value for {name}: {exc}") from None
    return value


def _validate(settings: Settings) -> None:
    for (section, key), allowed in CHOICES.items():
        value = getattr(getattr(settings, section), key)
        if isinstance(value, str) and section in ("journal", "supervisor"):
            value = value.upper() if all(c.isupper() for c in allowed) else value.lower()
            setattr(getattr(settings, section), key, value)
        if value not in allowed:
            raise ConfigError(f"bad value for {section}.{key}: {value!r} (one of {', '.join(allowed)})")
    for section, key in POSITIVE:
        value = getattr(getattr(settings, section), key)
        if value <= 0:
            raise ConfigError(f"bad value for {section}.{key}: {value!r} (must be > 0)")
    for key in ("requests_per_minute", "tokens_per_minute", "completion_tokens_per_sms",
                "completion_tokens_margin"):
        if getattr(settings.llm, key) < 0:
            raise ConfigError(f"bad value for llm.{key}: must be >= 0 (0 means no limit)")
    for key in ("price_prompt_per_mtok", "price_completion_per_mtok"):
        value = getattr(settings.llm, key)
        if value and not re.fullmatch(r"[0-9]+(\.[0-9]+)?", value.strip()):
            raise ConfigError(f"bad value for llm.{key}: {value!r} (a decimal string such as \"0.15\", or \"\")")
    if settings.supervisor.metrics_listen:
        try:
            parse_listen(settings.supervisor.metrics_listen)
        except ListenError as exc:
            raise ConfigError(f"bad value for supervisor.metrics_listen: {exc}") from None
    for key in ("trickle_wait_ms", "flush_max_wait_ms", "group_write_wait_ms"):
        if getattr(settings.pipeline, key) < 0:
            raise ConfigError(f"bad value for pipeline.{key}: must be >= 0")
    if not 0 < settings.lease.renew_fraction < 1:
        raise ConfigError("bad value for lease.renew_fraction: must be between 0 and 1")
    if not settings.mongo.uri:
        raise ConfigError("mongo.uri is empty")
