"""One end of the home link (``agent.homelink``'s messages) over a sealed TCP stream, with the
silence check: a side that hears nothing for ``timeout`` seconds, sees the stream end without
a ``Bye``, or gets a record that fails, has lost the link (``LinkLost``).
"""
from __future__ import annotations

import trio

from agent.homelink import MAX_MESSAGE, Beat, Message, beat_interval, decode, encode
from transport.errors import MigrationError, ProtocolError
from transport.tcp import SealedStream


class LinkLost(MigrationError):
    """The other end stopped answering, or left without saying goodbye."""

    code = "home-link-lost"


class Link:
    """One end of the home link: messages over a sealed stream, and the silence check."""

    def __init__(self, stream: SealedStream, timeout: float) -> None:
        self.stream = stream
        self.timeout = timeout
        self.closed = False
        self._send_lock = trio.Lock()

    async def send(self, msg: Message) -> None:
        if self.closed:
            return
        async with self._send_lock:
            try:
                await self.stream.send_record(encode(msg))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise LinkLost(f"the link broke ({exc})") from None

    async def receive(self) -> Message:
        """The next message other than a beat; LinkLost after ``timeout`` s of silence, at an
        end without ``Bye``, or on a broken stream."""
        while True:
            try:
                with trio.fail_after(self.timeout):
                    data = await self.stream.receive_record(MAX_MESSAGE)
            except trio.TooSlowError:
                raise LinkLost(f"no word for {self.timeout:g} s") from None
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise LinkLost(f"the link broke ({exc})") from None
            except ProtocolError as exc:
                raise LinkLost(f"the link failed: {exc}") from None
            if data is None:
                raise LinkLost("the other end closed the link without saying goodbye")
            msg = decode(data)
            if not isinstance(msg, Beat):
                return msg

    async def beats(self) -> None:
        """Send a beat now and then, until cancelled or the link breaks."""
        while True:
            await trio.sleep(beat_interval(self.timeout))
            try:
                await self.send(Beat())
            except LinkLost:
                return

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            with trio.CancelScope(shield=True):
                try:
                    await self.stream.aclose()
                except (trio.BrokenResourceError, OSError):
                    pass
