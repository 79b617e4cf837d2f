"""A Hub repo's weight files read in place: HTTP range requests instead of a download.

``in_place(repo_id, files, commit)`` downloads a repo's small files (config, index, tokenizer: what
``source.needed_files`` picks besides the weights) into huggingface_hub's cache, and registers each
safetensors weight file with ``io.remote`` under the path it would have in that snapshot, as a
:class:`HubFile`. Opening the checkpoint then reads each header by range (two requests a file: its length,
then the header, and not a byte more; kept for the process, io.remote) and each tensor by range when the plan
reads it (``--stream``). Nothing of a weight file is written to disk. A file the cache already holds is read
from disk.

Ranges are asked of the file's ``resolve`` URL at the commit the small files came from, as huggingface_hub's
own ``HfFileSystem`` asks them (``Range: bytes=a-b``, redirects followed, its session and token); a dropped
connection is resumed from the first byte not received, up to :data:`RETRIES` times in a row.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LorasurgeonError
from ..io.remote import register

RETRIES = 5  # failed attempts in a row before a read gives up
WAIT = 0.5  # seconds before the first retry; doubled each time, at most 8
CHUNK = 1 << 20


@dataclass
class Fetched:
    """What the in-place reads of this process cost: bytes received, requests made, connections resumed."""

    bytes: int = 0
    requests: int = 0
    resumed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, nbytes: int = 0, requests: int = 0, resumed: int = 0) -> None:
        with self.lock:
            self.bytes, self.requests, self.resumed = (
                self.bytes + nbytes,
                self.requests + requests,
                self.resumed + resumed,
            )


FETCHED = Fetched()


class HubFile:
    """One file of a Hub repo at one commit, read by range (io.remote.RemoteFile)."""

    def __init__(self, url: str, size: int, token: str | None):
        self._url, self._size, self.token = url, size, token

    @property
    def url(self) -> str:
        return self._url

    @property
    def size(self) -> int:
        return self._size

    def read_into(self, view: memoryview, offset: int) -> None:
        """``view`` filled from ``offset``: one ranged GET, resumed where it stopped when the connection drops."""
        if offset + len(view) > self._size:
            raise EOFError(self._url)
        from huggingface_hub.utils import build_hf_headers

        done, failures = 0, 0
        headers = build_hf_headers(token=self.token or None)
        while done < len(view):
            try:
                done += self._get(view[done:], offset + done, headers)
                failures = 0 if done < len(view) else failures
            except _Dropped as exc:
                done += exc.received
                failures += 1
                if failures > RETRIES:
                    raise LorasurgeonError(
                        f"{self._url}: the connection dropped {failures} times in a row while reading bytes "
                        f"{offset + done}-{offset + len(view) - 1} ({exc.reason})"
                    ) from None
                FETCHED.add(resumed=1)
                time.sleep(min(8.0, WAIT * 2 ** (failures - 1)))

    def _get(self, view: memoryview, offset: int, headers: dict[str, str]) -> int:
        """One ranged GET into ``view``; the bytes received. Raises _Dropped (with what came) on a cut transfer."""
        from huggingface_hub import constants
        from huggingface_hub.errors import HfHubHTTPError
        from huggingface_hub.utils import get_session, hf_raise_for_status

        got = 0
        want = f"bytes={offset}-{offset + len(view) - 1}"
        FETCHED.add(requests=1)
        try:
            with get_session().stream(
                "GET",
                self._url,
                headers={**headers, "Range": want},
                timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT,
                follow_redirects=True,
            ) as response:
                if response.status_code in (429, 500, 502, 503, 504):
                    raise _Dropped(0, f"the Hub answered {response.status_code}")
                if response.status_code >= 400:
                    response.read()  # the error's body, for its message
                    hf_raise_for_status(response)
                if response.status_code != 206 and not (offset == 0 and len(view) == self._size):
                    raise LorasurgeonError(
                        f"{self._url}: the server does not serve byte ranges (it answered {response.status_code} "
                        f"to Range: {want}): it cannot be read in place (drop --stream, or download the repo and "
                        "pass its folder)"
                    )
                for chunk in response.iter_bytes(CHUNK):
                    n = min(len(chunk), len(view) - got)
                    view[got : got + n] = chunk[:n]
                    got += n
                    FETCHED.add(nbytes=n)
        except HfHubHTTPError as exc:
            raise LorasurgeonError(f"{self._url}: the Hub answered {str(exc).splitlines()[0]}") from None
        except LorasurgeonError:
            raise
        except Exception as exc:  # httpx's transport errors: a refused, reset or cut connection, a timeout
            if not _transport(exc):
                raise
            raise _Dropped(got, f"{type(exc).__name__}: {exc}") from None
        if got < len(view):
            raise _Dropped(got, f"the response ended after {got} of {len(view)} bytes")
        return got


class _Dropped(Exception):
    def __init__(self, received: int, reason: str):
        super().__init__(reason)
        self.received, self.reason = received, reason


def _transport(exc: BaseException) -> bool:
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(names & {"TransportError", "NetworkError", "TimeoutException", "RemoteProtocolError"}) or isinstance(
        exc, OSError
    )


def in_place(repo_id: str, files: dict[str, int | None], commit: str) -> Path:
    """The snapshot folder of ``repo_id`` at ``commit`` with its small files downloaded and each safetensors
    weight file among ``files`` (name -> size) registered to be read in place."""
    from huggingface_hub import hf_hub_url, snapshot_download

    endpoint = os.environ.get("HF_ENDPOINT") or None
    token = os.environ.get("HF_TOKEN") or None
    weights = {f: s for f, s in files.items() if f.endswith(".safetensors")}
    small = [f for f in files if f not in weights]
    folder = Path(
        snapshot_download(
            repo_id, revision=commit, allow_patterns=small or ["config.json"], endpoint=endpoint, token=token
        )
    )
    folder.mkdir(parents=True, exist_ok=True)
    for name, size in weights.items():
        if size is None:
            raise LorasurgeonError(
                f"{repo_id}: the Hub gave no size for {name}: it cannot be read in place (drop --stream, or download "
                "the repo and pass its folder)"
            )
        url = hf_hub_url(repo_id, name, revision=commit, endpoint=endpoint)
        register(folder / name, HubFile(url, size, token))
    return folder
