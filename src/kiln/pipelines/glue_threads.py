"""torch's own ops between compiled calls run on one thread.

diffusers' schedulers and guidance and transformers' logits processing and beam bookkeeping
are small torch ops between the runtime's calls. Right after an onnxruntime or OpenVINO
call, the runtime's worker threads keep spinning on the cores torch's thread pool wants:
measured on a 2-core AMD EPYC, three `torch.where` + `clone` on a (3, 30524) tensor took
103 ms after onnxruntime and 68 ms after OpenVINO with torch's 2 threads, 1.9 and 1.7 ms
with one (0.7 ms on an idle machine). BLIP-base's beam search lost 30 ms a step to it.
One thread is all those ops need; a plan that computes with torch on the CPU keeps torch's
threads. Calls may nest and overlap (a server's threads): the first in sets one thread,
the last out restores what was there.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from kiln.runtimes.base import Session

_lock = threading.Lock()
_inside = 0
_saved: int | None = None

F = TypeVar("F", bound=Callable[..., Any])


def computes_with_torch_on_cpu(sessions: Iterable[Session]) -> bool:
    return any(s.runtime == "torch" and str(s.device).startswith("cpu") for s in sessions)


@contextlib.contextmanager
def single_threaded_torch(active: bool = True) -> Iterator[None]:
    global _inside, _saved
    if not active:
        yield
        return
    import torch

    with _lock:
        if _inside == 0:
            _saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _inside += 1
    try:
        yield
    finally:
        with _lock:
            _inside -= 1
            if _inside == 0 and _saved is not None:
                torch.set_num_threads(_saved)


def glue_on_one_thread(method: F) -> F:
    """Decorate a Deployment method: its torch glue runs on one thread (see above)."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        active = not computes_with_torch_on_cpu(self.sessions.values())
        with single_threaded_torch(active):
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
