"""The embedded server's Redis, shared with the command line.

With ``POOLRELAY_REDIS_URL=memory://`` (the default) the live pool state — quarantines, 529
backoffs, in-flight leases, headroom — lives in the server's in-process fakeredis. So that
``poolrelay accounts …`` sees and acts on that state, ``serve`` also serves the very same
:class:`fakeredis.FakeServer` on a Unix domain socket (:func:`share`), and the command line,
finding a server there, talks to it with a real redis-py client (:func:`connect`); the
scheduler's Lua scripts run on the server's data as they do in the server itself. With no
server running the command line keeps its own empty fakeredis and the database's durable copy.

Where (:func:`socket_path`): beside the SQLite file, ``<file>.redis.sock``
(``./poolrelay.db.redis.sock`` for the default ``./poolrelay.db``). When that path would not fit
in a socket address (about 100 bytes), or the database is not a file (PostgreSQL with
``memory://``), ``/tmp/poolrelay-<uid>/<hash of the database>.redis.sock``, in a directory only
its user may enter.

Who may connect: the socket is mode 0600 and, on Linux, a connection from another user (root
excepted) is closed at once (``SO_PEERCRED``). Redis holds no credentials, but it holds the
pool state.

Lifetime: created when the server starts, removed when it stops. One left behind by a killed
server (nobody answers on it) is replaced. A live one (another server on the same database, an
unsupported set-up) is left alone and this server does not share its Redis. Sharing is an aid
to the operator, never a condition to serve: when it cannot be set up, the server logs why and
runs on.

Threads: the listener and each connection run in daemon threads. They execute commands on the
shared FakeServer under fakeredis's own lock, which is all they share with the event loop.
Platforms without Unix sockets (Windows) do not share: there the command line shows the
database's copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import io
import itertools
import logging
import os
import select
import selectors
import socket
import socketserver
import stat
import struct
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from sqlalchemy.engine import make_url

from app.redis import fake_server_of
from app.settings import Settings

if TYPE_CHECKING:
    from fakeredis import FakeRedisConnection, FakeServer
    from typing_extensions import Buffer

log = logging.getLogger("poolrelay")

SUPPORTED = hasattr(socket, "AF_UNIX") and hasattr(socketserver, "ThreadingUnixStreamServer")
PATH_MAX_BYTES = 100
"""Longest socket path used as is (``sun_path`` holds 108 bytes on Linux, 104 on macOS)."""
RUNTIME_DIR = Path("/tmp")
PROBE_SECONDS = 2.0
"""How long a server has to answer PING before the command line gives up on it."""


class Unreachable(Exception):
    """A socket is there but cannot be used; the message says why."""


# --- where ------------------------------------------------------------------------------------


def socket_path(settings: Settings) -> Path:
    """Where the embedded server serving ``settings.database_url`` listens."""
    database = _database_file(settings.database_url)
    if database is not None:
        beside = database.with_name(database.name + ".redis.sock")
        if len(os.fsencode(beside)) <= PATH_MAX_BYTES:
            return beside
        identity = str(database)
    else:
        identity = _database_identity(settings.database_url)
    digest = hashlib.sha256(identity.encode()).hexdigest()[:24]
    return _private_dir() / f"{digest}.redis.sock"


def _database_file(url: str) -> Path | None:
    try:
        parsed = make_url(url)
    except Exception:
        return None
    name = parsed.database
    if not parsed.drivername.startswith("sqlite") or not name or name == ":memory:":
        return None
    if name.startswith("file:"):
        return None
    return Path(name).resolve()


def _database_identity(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def _private_dir() -> Path:
    uid = os.geteuid() if hasattr(os, "geteuid") else 0
    return RUNTIME_DIR / f"poolrelay-{uid}"


def _check_private_dir(path: Path, *, create: bool) -> bool:
    """True when ``path`` is a directory of this user that no one else may enter."""
    if create:
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    return (
        stat.S_ISDIR(info.st_mode)
        and info.st_uid == os.geteuid()
        and not stat.S_IMODE(info.st_mode) & 0o077
    )


# --- is anyone there --------------------------------------------------------------------------


def answers(path: Path, timeout: float = PROBE_SECONDS) -> bool:
    """True when a server answers PING on ``path``; False when nobody listens there (no socket,
    or one left behind by a killed server). :class:`Unreachable` otherwise."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
        except PermissionError:
            raise Unreachable(
                f"{path}: permission denied (a server run by another user?)"
            ) from None
        except OSError as exc:
            raise Unreachable(f"{path}: {exc.strerror or exc}") from None
        reply = b""
        try:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            while not reply.endswith(b"\r\n") and len(reply) < 256:
                chunk = sock.recv(256)
                if not chunk:
                    break
                reply += chunk
        except TimeoutError:
            raise Unreachable(f"{path}: no answer within {timeout:g} s") from None
        except (BrokenPipeError, ConnectionResetError):
            reply = b""
        except OSError as exc:
            raise Unreachable(f"{path}: {exc.strerror or exc}") from None
    if reply != b"+PONG\r\n":
        if not reply:
            raise Unreachable(f"{path}: the server closed the connection (another user's?)")
        raise Unreachable(f"{path}: not a poolrelay server (it answered {reply[:40]!r})")
    return True


# --- the command line's side ------------------------------------------------------------------


async def connect(settings: Settings) -> aioredis.Redis | None:
    """A client on the running embedded server's Redis; None when no server serves one.
    Raises :class:`Unreachable` when a socket is there but cannot be used."""
    if not SUPPORTED or not settings.is_memory_redis:
        return None
    path = socket_path(settings)
    if path.parent == _private_dir() and not _check_private_dir(path.parent, create=False):
        if path.parent.exists():
            raise Unreachable(f"{path.parent} is not a private directory of this user")
        return None
    if not await asyncio.to_thread(answers, path):
        return None
    client: aioredis.Redis = aioredis.Redis(
        unix_socket_path=os.fspath(path), socket_connect_timeout=5, socket_timeout=30
    )
    return client


# --- the server's side ------------------------------------------------------------------------


class SharedRedis:
    """A server's in-process Redis, served on a Unix socket (or nothing: see ``path``)."""

    def __init__(self, server: _UnixFakeServer | None = None, path: Path | None = None) -> None:
        self._server = server
        self.path = path if server is not None else None
        """The socket served, or None when this process does not share its Redis."""
        self._inode: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        if server is not None and path is not None:
            info = os.stat(path)
            self._inode = (info.st_dev, info.st_ino)
            self._thread = threading.Thread(
                target=server.serve_until_stopped, name="poolrelay-embedded-redis", daemon=True
            )
            self._thread.start()

    async def close(self) -> None:
        """Stop serving and remove the socket (only if it is still this server's)."""
        server, self._server = self._server, None
        if server is None:
            return
        if self.path is not None:
            with contextlib.suppress(OSError):
                info = os.stat(self.path)
                if (info.st_dev, info.st_ino) == self._inode:
                    os.unlink(self.path)
        server.stop()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5)
        server.server_close()


async def share(settings: Settings, redis: aioredis.Redis) -> SharedRedis:
    """Serve ``redis`` (when it is the in-process one) to the command line; see the module."""
    fake = fake_server_of(redis)
    if fake is None or not SUPPORTED:
        return SharedRedis()
    try:
        return await asyncio.to_thread(_start, socket_path(settings), fake)
    except Exception as exc:
        log.warning("the command line will not see the live pool state: %s", exc)
        return SharedRedis()


def _start(path: Path, fake: FakeServer) -> SharedRedis:
    if path.parent == _private_dir() and not _check_private_dir(path.parent, create=True):
        raise Unreachable(f"{path.parent} is not a private directory of this user")
    try:
        info: os.stat_result | None = os.lstat(path)
    except FileNotFoundError:
        info = None
    if info is not None:
        if not stat.S_ISSOCK(info.st_mode):
            raise Unreachable(f"{path} exists and is not a socket; remove it")
        if answers(path, timeout=1.0):
            raise Unreachable(f"another server on this database already serves {path}")
        os.unlink(path)  # left behind by a server that was killed
        log.info("replaced a stale embedded Redis socket at %s", path)
    server = _UnixFakeServer(os.fspath(path), fake)
    try:
        # Linux creates the socket file with the mode of the unbound socket, so it is never
        # open to others, even for a moment; elsewhere the chmod right after the bind does it.
        with contextlib.suppress(OSError):
            os.fchmod(server.socket.fileno(), 0o600)
        server.server_bind()
        os.chmod(path, 0o600)
        server.server_activate()
        server.socket.setblocking(False)
    except BaseException:
        server.server_close()
        raise
    log.info("embedded Redis shared with the command line on %s", path)
    return SharedRedis(server, path)


class _UnixFakeServer(socketserver.ThreadingUnixStreamServer):
    """fakeredis's socket server (:class:`fakeredis.TcpFakeServer`), on a Unix socket and on
    an existing :class:`fakeredis.FakeServer`."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, path: str, fake: FakeServer) -> None:
        self.fake_server = fake
        self.clients: dict[Any, FakeRedisConnection] = {}
        self.connection_ids = itertools.count(1)
        self.stop_connections = threading.Event()
        self._shutdown_event = self.stop_connections  # the name fakeredis's handler reads
        self._wake, self._woken = socket.socketpair()
        super().__init__(path, _handler_class(), bind_and_activate=False)

    def serve_until_stopped(self) -> None:
        """Accept connections until :meth:`stop`: it wakes the wait, nothing polls."""
        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ)
            selector.register(self._woken, selectors.EVENT_READ)
            while not self.stop_connections.is_set():
                ready = selector.select()
                if self.stop_connections.is_set():
                    break
                if not any(key.fileobj is self.socket for key, _ in ready):
                    continue
                try:
                    request, address = self.get_request()
                except OSError:  # gone before it was accepted
                    continue
                if not self.verify_request(request, address):
                    self.shutdown_request(request)
                    continue
                try:
                    self.process_request(request, address)  # a daemon thread per connection
                except Exception:
                    self.handle_error(request, address)
                    self.shutdown_request(request)

    def stop(self) -> None:
        """End the accept loop and every connection (their threads see it within 10 ms)."""
        self.stop_connections.set()
        with contextlib.suppress(OSError):
            self._wake.send(b"x")

    def server_close(self) -> None:
        super().server_close()
        self._wake.close()
        self._woken.close()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return _peer_allowed(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("embedded Redis connection failed", exc_info=True)


def _peer_allowed(sock: socket.socket) -> bool:
    """On Linux: only this user (and root) may talk to the server's Redis."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return True  # the socket's mode (0600) and its directory decide
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    except OSError:
        return False
    _pid, uid, _gid = struct.unpack("3i", raw)
    return uid in (os.geteuid(), 0)


@functools.cache
def _handler_class() -> type[socketserver.BaseRequestHandler]:
    """fakeredis's connection handler (imported only by a server that shares its Redis)."""
    from fakeredis._clients._tcp_server import TCPFakeRequestHandler

    class Handler(TCPFakeRequestHandler):
        server: _UnixFakeServer  # type: ignore[assignment]

        def setup(self) -> None:
            # A Unix client has no address, and fakeredis keys its connections by it.
            self.client_address = ("unix", next(self.server.connection_ids))
            super().setup()
            # fakeredis makes the socket non-blocking for its reads; a large reply must still
            # go out whole, however slowly the client reads (its own writer gives up).
            self.writer.writer = _Sender(self.connection)

    return Handler


class _Sender(io.BufferedIOBase):
    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock

    def write(self, data: Buffer, /) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        while view:
            try:
                sent = self._sock.send(view)
            except BlockingIOError:
                if not select.select([], [self._sock], [], 30)[1]:
                    raise TimeoutError("the client stopped reading") from None
                continue
            view = view[sent:]
        return total

    def flush(self) -> None:
        pass
