"""The shared vocabulary of smsd: SMS, results, transactions, ids.

Every other module speaks in these types, so that the journal, the store and
the LLM client never need to know about each other.

Money never passes through ``float``: amounts are ``Decimal`` here, strings
in JSON (the journal and the wire format) and ``Decimal128`` in MongoDB.
"""
from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import bson
from bson import ObjectId

KINDS = ("transaction", "declined", "otp", "promotion", "balance", "bill_due", "other")
DIRECTIONS = ("debit", "credit")
CHANNELS = ("upi", "imps", "neft", "rtgs", "card", "atm", "netbanking", "wallet", "mandate", "other")
MONEY_RE = re.compile(r"^[0-9]+(\.[0-9]+)?$")
CURRENCY_RE = re.compile(r"^[A-Z]{3}$")
#: Optional transaction fields of the contract, in schema order.
OPTIONAL_FIELDS = ("channel", "account_mask", "card_mask", "counterparty", "reference",
                   "balance", "occurred_at", "bank")


def sms_key(raw_id: Any) -> str:
    """A stable, unique string for a raw SMS ``_id`` of any BSON type.

    The key is what the LLM sees as the SMS ``id`` and what the journal is
    keyed on.  Strings and ObjectIds stay readable; the type prefix keeps the
    string ``"5"`` and the integer ``5`` apart.
    """
    if isinstance(raw_id, str):
        return "s:" + raw_id
    if isinstance(raw_id, ObjectId):
        return "o:" + str(raw_id)
    if isinstance(raw_id, bool):  # bool is an int subclass; keep it apart
        return "b:" + _encode_any(raw_id)
    if isinstance(raw_id, int):
        return "i:" + str(raw_id)
    return "b:" + _encode_any(raw_id)


def wire_ids(n: int) -> list[str]:
    """The ids of the ``n`` SMS of one call on the wire: "1".."n" (local to that call)."""
    return [str(i) for i in range(1, n + 1)]


def _encode_any(value: Any) -> str:
    return base64.urlsafe_b64encode(bson.encode({"v": value})).decode("ascii")


def raw_id_to_bytes(raw_id: Any) -> bytes:
    """Encode a raw ``_id`` losslessly (BSON) for storage in the journal."""
    return bson.encode({"v": raw_id})


def raw_id_from_bytes(data: bytes) -> Any:
    """Inverse of :func:`raw_id_to_bytes`."""
    return bson.decode(data)["v"]


def transaction_id(key: str, index: int) -> str:
    """The deterministic ``_id`` of the ``index``-th transaction of an SMS.

    Derived only from the SMS key and the position in the answer, so every
    re-flush of the same journal row upserts the same documents (invariant 2).
    Long keys are hashed to keep the ``_id`` small.
    """
    if len(key) > 200:
        key = "h:" + hashlib.sha256(key.encode("utf-8")).hexdigest()
    return f"{key}#{index}"


@dataclass(frozen=True)
class Sms:
    """One raw SMS as read from ``sms_fin_rawdata``, already checked to be well-formed."""

    raw_id: Any
    key: str
    user_id: str
    text: str
    sender: str | None = None
    received_at: datetime | None = None

    def wire(self, wire_id: str | None = None) -> dict:
        """The SMS as the contract's request item: ``{id, text, sender, received_at}``.

        ``wire_id`` is the id local to one call ("1".."N"); default: the SMS key.
        """
        return {
            "id": self.key if wire_id is None else wire_id,
            "text": self.text,
            "sender": self.sender,
            "received_at": self.received_at.isoformat() if self.received_at else None,
        }


@dataclass(frozen=True)
class Malformed:
    """A raw document that cannot be sent to the LLM (no text, not a string, too long...)."""

    raw_id: Any
    key: str
    user_id: str
    reason: str


@dataclass(frozen=True)
class Transaction:
    """One transaction found in an SMS.  Amount and balance are exact Decimals."""

    direction: str
    amount: Decimal
    currency: str
    channel: str | None = None
    account_mask: str | None = None
    card_mask: str | None = None
    counterparty: str | None = None
    reference: str | None = None
    balance: Decimal | None = None
    occurred_at: str | None = None
    bank: str | None = None

    def to_json(self) -> dict:
        """JSON-safe form (money as strings), as stored in the journal."""
        out = {"direction": self.direction, "amount": str(self.amount), "currency": self.currency}
        for name in OPTIONAL_FIELDS:
            value = getattr(self, name)
            out[name] = str(value) if isinstance(value, Decimal) else value
        return out

    @classmethod
    def from_json(cls, data: dict) -> "Transaction":
        """Inverse of :meth:`to_json`; money strings become Decimals."""
        balance = data.get("balance")
        return cls(
            direction=data["direction"],
            amount=Decimal(data["amount"]),
            currency=data["currency"],
            channel=data.get("channel"),
            account_mask=data.get("account_mask"),
            card_mask=data.get("card_mask"),
            counterparty=data.get("counterparty"),
            reference=data.get("reference"),
            balance=Decimal(balance) if balance is not None else None,
            occurred_at=data.get("occurred_at"),
            bank=data.get("bank"),
        )


@dataclass(frozen=True)
class SmsResult:
    """The validated answer for one SMS: its kind and the transactions found."""

    key: str
    kind: str
    transactions: tuple[Transaction, ...] = ()

    def to_json(self) -> dict:
        return {"id": self.key, "kind": self.kind,
                "transactions": [t.to_json() for t in self.transactions]}

    @classmethod
    def from_json(cls, data: dict) -> "SmsResult":
        return cls(key=data["id"], kind=data["kind"],
                   transactions=tuple(Transaction.from_json(t) for t in data["transactions"]))


@dataclass(frozen=True)
class Provenance:
    """Where a result came from: stored on every transaction document."""

    call_id: str
    model: str
    request_id: str | None
    answered_at: datetime
    owner: str = ""
    epoch: int = 0


@dataclass
class Usage:
    """Token usage of one LLM call."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0       # of prompt_tokens, served from the provider's prefix cache


@dataclass
class FlushItem:
    """One SMS result ready to be written to MongoDB."""

    raw_id: Any
    user_id: str
    result: SmsResult
    provenance: Provenance


@dataclass
class Quarantine:
    """An SMS taken out of the pending set, with why and after how many attempts."""

    raw_id: Any
    key: str
    user_id: str
    reason: str
    attempts: int = 0
    extra: dict = field(default_factory=dict)
