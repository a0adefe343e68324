"""pytest plugin: a real MongoDB-wire server for the tests.

Loaded from ``tests/conftest.py``.  Fixtures:

* ``mongo_server`` (session): ``SMSD_TEST_MONGO_URI`` when set (a real
  ``mongod``; ``kill()``/``restart()`` then skip the test), else one
  ``secantusd-py`` process (:class:`smsd.embedded.EmbeddedMongo`) in a tmp dir.
  ``.kill()`` SIGKILLs it, ``.restart()`` starts it again on the same port
  and storage.
* ``mongo_db_name`` (function): a fresh database name, dropped afterwards.
* ``store``: a :class:`smsd.store.Store` on that database, indexes ensured.
* ``own_mongo`` (function): a private, started ``EmbeddedMongo`` for tests that
  kill the database (``.kill()``, ``.start()`` again = same port + storage).

Helper: :func:`seed_sms` inserts raw SMS documents.
"""
from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pymongo
import pytest
from bson import ObjectId

from smsd.embedded import EmbeddedMongo, EmbeddedUnavailable
from smsd.store import RAW_COLLECTION, Store

ENV_URI = "SMSD_TEST_MONGO_URI"

DEFAULT_TEXTS = (
    "INR {amount} debited from A/c XX1234 on 05-09-26 UPI/P2M/{n:012d}/SHOP {n} - Demo Bank",
    "Rs.{amount} credited to A/c XX9876 on 06-09-26 by NEFT ref {n:010d}. Avl Bal Rs.10000.00",
    "Your OTP for login is {n:06d}. Do not share it with anyone.",
)


class MongoServer:
    """What ``mongo_server`` yields: ``.uri``, and ``.kill()``/``.restart()`` when embedded."""

    def __init__(self, uri: str, embedded: EmbeddedMongo | None = None) -> None:
        self.uri = uri
        self.embedded = embedded

    @property
    def is_embedded(self) -> bool:
        return self.embedded is not None

    def _need_embedded(self) -> EmbeddedMongo:
        if self.embedded is None:
            pytest.skip(f"needs the embedded server (unset {ENV_URI})")
        return self.embedded

    def kill(self) -> None:
        """SIGKILL the server (embedded only)."""
        self._need_embedded().kill()

    def restart(self, timeout: float = 30) -> str:
        """Start it again on the same port and storage (after ``kill()`` or while running)."""
        emb = self._need_embedded()
        if emb.alive():
            emb.stop()
        return emb.start(timeout)

    def ensure_alive(self) -> None:
        """Restart the embedded server if an earlier test left it dead."""
        if self.embedded is not None and not self.embedded.alive():
            self.embedded.start()

    @property
    def pid(self) -> int | None:
        return self.embedded.pid if self.embedded is not None else None


def _embedded_or_fail(path, log_path) -> EmbeddedMongo:
    try:
        mongo = EmbeddedMongo(path, log_path=log_path)
        mongo.start()
        return mongo
    except EmbeddedUnavailable as exc:
        pytest.fail(f"no MongoDB for the tests: {exc}; or set {ENV_URI}", pytrace=False)


@pytest.fixture(scope="session")
def mongo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MongoServer]:
    """The session's MongoDB server (see module docstring)."""
    uri = os.environ.get(ENV_URI)
    if uri:
        yield MongoServer(uri)
        return
    base = tmp_path_factory.mktemp("secantus")
    mongo = _embedded_or_fail(base / "data", base / "secantusd.log")
    try:
        yield MongoServer(mongo.uri, mongo)
    finally:
        mongo.stop()


@pytest.fixture
def mongo_db_name(mongo_server: MongoServer) -> Iterator[str]:
    """A database name no other test uses; dropped after the test (best effort)."""
    name = f"smsd_test_{uuid.uuid4().hex[:12]}"
    yield name
    if mongo_server.embedded is not None and not mongo_server.embedded.alive():
        return
    client = pymongo.MongoClient(mongo_server.uri, serverSelectionTimeoutMS=2000)
    try:
        client.drop_database(name)
    except pymongo.errors.PyMongoError:
        pass
    finally:
        client.close()


@pytest.fixture
def db(mongo_server: MongoServer, mongo_db_name: str) -> Iterator[Any]:
    """A pymongo Database on the test's fresh database (tests may override it with their own)."""
    client = pymongo.MongoClient(mongo_server.uri)
    yield client[mongo_db_name]
    client.close()


@pytest.fixture
def store(mongo_server: MongoServer, mongo_db_name: str) -> Iterator[Store]:
    """A :class:`Store` on a fresh database of ``mongo_server``, indexes ensured."""
    mongo_server.ensure_alive()
    st = Store(mongo_server.uri, mongo_db_name, timeout_ms=3000)
    st.ensure_indexes()
    try:
        yield st
    finally:
        st.close()


@pytest.fixture
def own_mongo(tmp_path) -> Iterator[EmbeddedMongo]:
    """A private, started embedded server for a test that kills the database."""
    try:
        mongo = EmbeddedMongo(tmp_path / "own-mongo", log_path=tmp_path / "own-mongo.log")
        mongo.start()
    except EmbeddedUnavailable as exc:
        if os.environ.get(ENV_URI):
            pytest.skip(f"needs secantusd-py: {exc}")
        pytest.fail(str(exc), pytrace=False)
    try:
        yield mongo
    finally:
        mongo.stop()


def _raw_collection(target: Any, db_name: str | None) -> pymongo.collection.Collection:
    if isinstance(target, Store):
        return target.raw
    if isinstance(target, pymongo.collection.Collection):
        return target
    if isinstance(target, pymongo.database.Database):
        return target[RAW_COLLECTION]
    if isinstance(target, pymongo.MongoClient):
        if not db_name:
            raise ValueError("seed_sms(client, ...) needs db_name=")
        return target[db_name][RAW_COLLECTION]
    raise TypeError(f"seed_sms: cannot seed into {type(target).__name__}")


_MISSING = object()


def seed_sms(
    client_or_store: Any,
    user_id: Any,
    n: int,
    *,
    db_name: str | None = None,
    start: int = 0,
    id_type: str = "int",
    texts: Iterable[str] | None = None,
    isprocessed: Any = _MISSING,
    sender: Any = "VM-DEMOBK",
    received_at: datetime | None = None,
    text_field: str = "body",
    extra: dict | None = None,
) -> list:
    """Insert ``n`` raw SMS documents of ``user_id``; return their ``_id``\\ s in order.

    ``client_or_store``: a :class:`Store`, a ``MongoClient`` (with ``db_name``),
    a ``Database`` or the raw ``Collection``.  ``id_type``: ``"int"``
    (``start``, ``start+1``...), ``"str"`` (``"<user>-<i>"``) or ``"objectid"``
    (increasing).  ``texts`` cycles through the given texts, used verbatim
    (the default synthetic texts carry the index and an amount).  ``isprocessed`` is left out unless given
    (missing counts as false).  ``received_at`` is the first SMS's time, one
    minute apart after it.
    """
    coll = _raw_collection(client_or_store, db_name)
    given = texts is not None
    pool = itertools.cycle(list(texts) if given else DEFAULT_TEXTS)
    t0 = received_at or datetime(2026, 9, 1, 9, 0, tzinfo=timezone.utc)
    docs = []
    for i in range(start, start + n):
        if id_type == "int":
            raw_id: Any = i
        elif id_type == "str":
            raw_id = f"{user_id}-{i:06d}"
        elif id_type == "objectid":
            raw_id = ObjectId()
        else:
            raise ValueError(f"id_type {id_type!r}")
        template = next(pool)
        amount = f"{(i % 97) * 10 + 1}.{i % 100:02d}"
        doc: dict[str, Any] = {
            "_id": raw_id,
            "user_id": user_id,
            text_field: template if given else template.format(n=i, amount=amount),
            "received_at": t0 + timedelta(minutes=i - start),
        }
        if sender is not None:
            doc["sender"] = sender
        if isprocessed is not _MISSING:
            doc["isprocessed"] = isprocessed
        if extra:
            doc.update(extra)
        docs.append(doc)
    if docs:
        coll.insert_many(docs, ordered=True)
    return [d["_id"] for d in docs]


@pytest.fixture
def seed(store: Store):
    """``seed(user_id, n, **kw)`` = :func:`seed_sms` into the ``store`` fixture's database."""
    def _seed(user_id: Any, n: int, **kw: Any) -> list:
        return seed_sms(store, user_id, n, **kw)
    return _seed
