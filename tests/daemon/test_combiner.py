"""The group turn's LLM call combiner (smsd.combiner) and the flush writes waiting on it.

The extractor is smsd's own rules extractor (no paid call), so only the combiner's
holding rules are under test: who a held call waits for.
"""
from __future__ import annotations

import threading
import time

from smsd.combiner import CallCombiner
from smsd.extractor import RulesExtractor
from smsd.model import Sms, sms_key

TEXT = "INR 120.00 debited from A/c XX1234 on 05-09-26 UPI/P2M/000000000001/SHOP - Demo Bank"


def _sms(user: str, i: int) -> Sms:
    raw_id = f"{user}-{i}"
    return Sms(raw_id=raw_id, key=sms_key(raw_id), user_id=user, text=TEXT)


def _ask(member, sms: list[Sms], out: dict) -> None:
    answer = member.extract(sms)
    out[member.user_id] = (time.monotonic(), sorted(answer.results))


def test_a_held_call_does_not_wait_for_a_member_that_is_writing_its_flush():
    """A member in a flush write batch waits for the others' answers (smsd.group_writes);
    if the held call waited for that member to ask, each would wait for the other."""
    wait_s = 3.0
    combiner = CallCombiner(RulesExtractor(), max_sms=25, wait_s=wait_s)
    writer, asker, idle = combiner.member("w"), combiner.member("a"), combiner.member("i")
    writer.asked = True                  # it asked earlier, got its answer, and is flushing now
    writer.writing = lambda: True
    idle.asked = True                    # asked before and is between steps: waited for
    out: dict = {}
    started = time.monotonic()
    t = threading.Thread(target=_ask, args=(asker, [_sms("a", 1)], out))
    t.start()
    time.sleep(0.3)
    assert "a" not in out                # held: the idle member may still ask
    idle.leave()                         # its turn is over: only the writer is left
    t.join(timeout=2 * wait_s)
    assert out["a"][1] == [sms_key("a-1")]
    # Released as soon as the idle member left, not after the held call's wait.
    assert out["a"][0] - started < wait_s, out["a"][0] - started
    assert combiner.calls == 1


def test_answering_says_a_member_has_a_request_held_or_in_flight():
    combiner = CallCombiner(RulesExtractor(), max_sms=2, wait_s=5.0)
    one, two = combiner.member("one"), combiner.member("two")
    assert not one.answering() and not two.answering()
    seen: list[bool] = []
    out: dict = {}
    t = threading.Thread(target=_ask, args=(one, [_sms("one", 1)], out))
    t.start()
    deadline = time.monotonic() + 5
    while not one.answering() and time.monotonic() < deadline:
        time.sleep(0.005)
    seen.append(one.answering())         # held: two has not asked yet
    t2 = threading.Thread(target=_ask, args=(two, [_sms("two", 1)], out))
    t2.start()
    t.join(5), t2.join(5)
    assert seen == [True] and set(out) == {"one", "two"}
    assert not one.answering() and not two.answering()
    one.leave()
    assert not one.answering()


def test_a_held_call_goes_out_once_the_member_it_waits_for_starts_writing_its_flush():
    """The member a held call waits for enters a flush write batch (which itself waits for
    the held call's members): the batch tells the combiner, and the call goes at once
    instead of after the combiner's whole wait."""
    from smsd.group_writes import GroupWrites, _Member
    wait_s = 3.0
    combiner = CallCombiner(RulesExtractor(), max_sms=25, wait_s=wait_s)
    writes = GroupWrites(wait_s=0.2, answer_wait_s=wait_s, notify=combiner.poke)
    writer, asker = combiner.member("w"), combiner.member("a")
    writer.asked = True                       # asked earlier and got its answer: it flushes next
    w = _Member("w", writer.elsewhere, writer.answering)
    a = _Member("a", asker.elsewhere, asker.answering)
    writes._members += [w, a]
    writer.writing = lambda: w.in_batch > 0
    out: dict = {}
    started = time.monotonic()
    t = threading.Thread(target=_ask, args=(asker, [_sms("a", 1)], out))
    t.start()
    time.sleep(0.3)
    assert "a" not in out                     # held: the writer, not writing yet, may ask again
    wrote: list[float] = []
    tw = threading.Thread(target=lambda: wrote.append(
        writes.submit(w, "transactions", None, lambda payloads: [time.monotonic()] * len(payloads))))
    tw.start()
    t.join(timeout=2 * wait_s)
    tw.join(timeout=2 * wait_s)
    assert out["a"][1] == [sms_key("a-1")]
    assert out["a"][0] - started < 1.5, out["a"][0] - started   # not the combiner's 3 s wait
    assert wrote and wrote[0] - started < 2.0, wrote
    assert combiner.calls == 1


def test_the_combiner_tells_the_group_writes_when_a_call_is_answered_and_when_a_member_leaves():
    """CallCombiner.on_change (GroupWrites.poke in a group turn): the two changes of a member's
    state that may let a waiting write batch go."""
    combiner = CallCombiner(RulesExtractor(), max_sms=1, wait_s=3.0)
    told: list[str] = []
    combiner.on_change = lambda: told.append("change")
    one = combiner.member("one")
    out: dict = {}
    _ask(one, [_sms("one", 1)], out)          # max_sms=1: the call goes at once
    assert told == ["change"]
    one.leave()
    assert told == ["change", "change"]


def test_a_write_batch_waiting_for_an_llm_call_looks_again_only_when_told_or_at_its_deadline():
    """The first caller of a batch waiting for a member whose call is in flight sleeps until a
    change is announced (GroupWrites.poke) or its deadline, at most POLL_S; its other callers
    wait only for their result.  It re-read every member's state every 3 ms before."""
    from smsd.group_writes import POLL_S, GroupWrites, _Member

    class Counting(GroupWrites):
        looks = 0

        def _ready(self, batch, waited):
            self.looks += 1
            return super()._ready(batch, waited)

    writes = Counting(wait_s=0.02, answer_wait_s=5.0)
    answering, done = threading.Event(), threading.Event()
    answering.set()
    slow = _Member("slow", lambda: done.is_set() or answering.is_set(), answering.is_set)
    first, second = _Member("w1", lambda: False, lambda: False), _Member("w2", lambda: False, lambda: False)
    writes._members += [slow, first, second]
    runs: list[int] = []
    results: dict = {}

    def write(m: _Member) -> None:
        results[m.name] = writes.submit(m, "mark", m.name, lambda payloads: runs.append(len(payloads)) or payloads)

    started = time.monotonic()
    threads = [threading.Thread(target=write, args=(m,)) for m in (first, second)]
    for t in threads:
        t.start()
    held = 0.6
    time.sleep(held)
    answering.clear()          # its call answered; its turn then ends without a write of this kind
    done.set()
    writes.poke()
    for t in threads:
        t.join(timeout=10)
    assert results == {"w1": "w1", "w2": "w2"} and runs == [2]      # one command for both
    assert time.monotonic() - started < 5.0                          # not the whole answer wait
    # About held / POLL_S looks (12), plus one per change; polling every 3 ms made ~200.
    assert POLL_S >= 0.03 and writes.looks <= 30, writes.looks
