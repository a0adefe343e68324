"""What the supervisor does around a fork (:mod:`smsd.children`): the child never finalizes what it
inherited, and the SDK's lazy modules are imported once, before any fork."""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

from smsd.children import fork


class _OwnsFd:
    """Garbage in a reference cycle whose finalizer closes a file descriptor (as a file object does)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.me = self

    def __del__(self) -> None:
        os.close(self.fd)


def test_a_forked_child_never_finalizes_inherited_garbage_and_the_parent_still_collects_its_own():
    victim = os.open(os.devnull, os.O_RDONLY)
    _OwnsFd(victim)                      # unreachable at once, collectable only by the cycle collector
    r, w = os.pipe()
    pid = fork()
    if pid == 0:   # the child: a full collection must leave the inherited fd open
        code = 1
        try:
            gc.collect()
            os.fstat(victim)
            os.write(w, f"{gc.get_freeze_count()}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    frozen_in_child = int(os.read(r, 64) or b"0")
    os.close(r)
    assert os.waitstatus_to_exitcode(status) == 0, "the child's collection finalized inherited garbage"
    assert frozen_in_child > 0
    assert gc.get_freeze_count() == 0     # the parent unfroze: its garbage is collected as before
    gc.collect()
    try:
        os.fstat(victim)
        raise AssertionError("the parent's collector did not finalize its own garbage")
    except OSError:
        pass


def test_after_preload_a_new_clients_first_call_imports_nothing():
    """The supervisor preloads before it forks, so no worker imports the SDK's lazy modules itself."""
    probe = (
        "import sys, json\n"
        "from smsd.children import preload\n"
        "from smsd.llm import LlmClient\n"
        "if sys.argv[1] == 'preload': preload()\n"
        "before = set(sys.modules)\n"
        "c = LlmClient(base_url='http://127.0.0.1:9/v1', api_key='k', model='m', timeout=5, max_retries=0)\n"
        "c._client.chat.completions.with_raw_response\n"   # what a call goes through first
        "print(json.dumps(sorted(set(sys.modules) - before)))\n")
    cold, warm = (json.loads(subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True,
                                            check=True, timeout=60).stdout) for mode in ("cold", "preload"))
    assert any(name.startswith("openai.resources.chat") for name in cold)   # lazy without the preload
    assert [name for name in warm if name.startswith(("openai", "httpcore"))] == []
