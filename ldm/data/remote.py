"""Open a shard (a local path, `http(s)://` or `pipe:CMD`) as a file that survives a flaky source.

`webdataset.gopen` reads http through a `curl` pipe: one dropped connection ends the shard, a server that
is down for a moment kills the run, and a failed command raises again when the stream is closed. Here:

* the bytes already read are counted, so a failure mid-shard re-opens at that offset (an http `Range`
  request; a command is re-run and its first bytes are skipped) and the tar reader never notices;
* a failure that could not read a byte (connection refused, reset, a stall longer than `timeout`) is
  waited out with exponential backoff for up to `max_wait` seconds without progress, then
  `DataUnavailable` stops the run (the loop checkpoints first);
* an answer that says "no" (http 4xx, a command that exits non-zero, http 5xx after `retries` tries)
  raises `ShardFailed`: the caller skips and counts that shard, and the run goes on.
"""
from __future__ import annotations

import dataclasses
import http.client
import logging
import subprocess
import time
import urllib.error
import urllib.request

from ldm.errors import DataUnavailable

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RetryPolicy:
    retries: int = 3  # re-tries of a shard whose source answers with an error (5xx, a failing command)
    timeout: float = 30.0  # seconds without a byte before a connection counts as stalled
    max_wait: float = 600.0  # seconds without any byte read before the run stops (DataUnavailable)
    backoff: float = 0.5  # first wait; doubled after each failure, at most `max_backoff`
    max_backoff: float = 30.0


class ShardFailed(OSError):
    """This shard cannot be read (its source answered with an error): skip it."""


class _Unreachable(OSError):
    """No answer at all (refused, reset, stalled): wait for the source to come back."""


class _Failing(OSError):
    """The source answers but fails (http 5xx, a command exiting non-zero): `retries` tries, then skipped."""


def _is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


class RetryingReader:
    """Read-only file over one shard; re-opens at the current offset after a failure (see module doc)."""

    def __init__(self, url: str, policy: RetryPolicy | None = None):
        self.url, self.policy = url, policy or RetryPolicy()
        self.offset, self.stream, self.proc, self.expected = 0, None, None, None
        self._open_with_retries()

    # -- opening ------------------------------------------------------------------------------------
    def _open(self) -> None:
        url, offset = self.url, self.offset
        if _is_http(url):
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            try:
                response = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                                  timeout=self.policy.timeout)
            except urllib.error.HTTPError as e:
                e.close()
                kind = ShardFailed if e.code < 500 or e.code in (501, 505) else _Failing
                raise kind(f"HTTP {e.code} {e.reason} for {url}") from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                raise _Unreachable(f"{url}: {getattr(e, 'reason', e)}") from None
            length = response.headers.get("Content-Length")
            self.expected = offset + int(length) if length is not None and response.status == 206 else \
                (int(length) if length is not None else None)
            self.stream = response
            if offset and response.status != 206:  # the server ignores Range: read past what we have
                self._discard(offset)
        elif url.startswith("pipe:"):
            self.proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         bufsize=1 << 20)
            self.stream = self.proc.stdout
            if offset:
                self._discard(offset)
        else:
            path = url[5:] if url.startswith("file:") else url
            try:
                self.stream = open(path, "rb")
            except OSError as e:
                raise ShardFailed(f"{path}: {e.strerror}") from None
            self.stream.seek(offset)

    def _discard(self, count: int) -> None:
        while count > 0:
            chunk = self.stream.read(min(count, 1 << 20))
            if not chunk:
                raise _Unreachable(f"{self.url}: ended before byte {self.offset} on re-opening")
            count -= len(chunk)

    def _open_with_retries(self) -> None:
        self._retry(lambda: None)

    def _retry(self, action):
        """Run `action` until it succeeds; each failure closes the shard, which is re-opened at
        `self.offset` before the next try (module doc)."""
        failures, server_errors, waited_since = 0, 0, None
        while True:
            try:
                if self.stream is None:
                    self._open()
                return action()
            except ShardFailed:
                self._close_stream()
                raise
            except _Failing as e:
                server_errors += 1
                if server_errors > self.policy.retries:
                    self._close_stream()
                    raise ShardFailed(f"{e} (after {self.policy.retries} retries)") from None
                reason = str(e)
            except (_Unreachable, OSError, http.client.HTTPException, ValueError) as e:
                reason = f"{type(e).__name__}: {e}" if not isinstance(e, _Unreachable) else str(e)
            self._close_stream()
            now = time.monotonic()
            if waited_since is None:
                log.warning("cannot read %s at byte %d (%s): retrying with backoff for up to %g s (data.max_wait)",
                            self.url, self.offset, reason, self.policy.max_wait)
            waited_since = waited_since or now
            if now - waited_since >= self.policy.max_wait:
                raise DataUnavailable(f"nothing could be read from {self.url} for {now - waited_since:.0f} s "
                                      f"(data.max_wait={self.policy.max_wait:g}); last error: {reason}")
            failures += 1
            time.sleep(min(self.policy.backoff * 2 ** (failures - 1), self.policy.max_backoff,
                           max(0.0, self.policy.max_wait - (now - waited_since))))

    # -- reading ------------------------------------------------------------------------------------
    def _read_once(self, size: int) -> bytes:
        data = self.stream.read(size) if size >= 0 else self.stream.read()
        if data:
            return data
        # End of stream: complete only if the source says so.
        if self.proc is not None:
            code = self.proc.wait()
            if code != 0:
                error = self.proc.stderr.read().decode(errors="replace").strip().splitlines()
                raise _Failing(f"{self.url}: command exited {code}" + (f" ({error[-1]})" if error else ""))
        elif self.expected is not None and self.offset < self.expected:
            raise _Unreachable(f"{self.url}: connection closed at byte {self.offset} of {self.expected}")
        return data

    def read(self, size: int = -1) -> bytes:
        data = self._retry(lambda: self._read_once(size))
        self.offset += len(data)
        return data

    def _close_stream(self) -> None:
        stream, proc, self.stream, self.proc = self.stream, self.proc, None, None
        try:
            if stream is not None:
                stream.close()
        except Exception:  # closing must never raise (a failed command already said why)
            pass
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            try:
                proc.stderr.close()
            except Exception:
                pass

    def close(self) -> None:
        self._close_stream()


def open_shard(url: str, policy: RetryPolicy | None = None) -> RetryingReader:
    return RetryingReader(url, policy)
