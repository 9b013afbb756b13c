# -*- coding: utf-8 -*-
# Copyright: contributors to this project
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Shared CurveZMQ plumbing for the zmq_curve_keypair and zmq_health modules.

Key pairs are stored exactly like pyzmq's ``zmq.auth.create_certificates``
writes them (``NAME.key`` holds the public key, ``NAME.key_secret`` holds the
public and the secret key), so ``zmq.auth.load_certificate`` and
``ThreadAuthenticator.configure_curve(location=DIR)`` read them unchanged.

Security rules followed by everything in this file:

* a secret key never appears in a return value that is meant for output,
  in an exception message, or in a ``repr``;
* secret key files are created inside a private (0700) temporary directory
  in the target directory with umask 077, get their final attributes there
  and are then moved into place with ``os.replace`` (atomic, same file system);
* the pair is only inspected, written or removed under ``keypair_lock`` (an
  ``fcntl.flock`` on ``.zmq_curve_keypair.lock`` in the directory), so
  concurrent runs never leave or see a public key that does not match its
  secret.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import contextlib
import errno
import fcntl
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import traceback

try:
    import zmq
    import zmq.auth
    HAS_ZMQ = True
    ZMQ_IMPORT_ERROR = None
except ImportError:  # pragma: no cover - exercised on hosts without pyzmq
    zmq = None
    HAS_ZMQ = False
    ZMQ_IMPORT_ERROR = traceback.format_exc()

#: Z85 alphabet (ZeroMQ RFC 32).
Z85_CHARS = ("0123456789abcdefghijklmnopqrstuvwxyz"
             "ABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#")
Z85_KEY_RE = re.compile(r'^[%s]{40}$' % re.escape(Z85_CHARS))

PUBLIC_SUFFIX = '.key'
SECRET_SUFFIX = '.key_secret'

#: Names of the files in a certificates directory, as the agents use them.
CLIENT_CERT_NAME = 'client'
SERVER_CERT_NAME = 'server'


class CurveKeyError(Exception):
    """Invalid or unusable CURVE key material. Messages never contain secrets."""


def _to_text(value):
    if isinstance(value, bytes):
        return value.decode('ascii', 'replace')
    return value


def _to_bytes(value):
    if isinstance(value, bytes):
        return value
    return value.encode('ascii')


def is_z85_key(value):
    """True if ``value`` (str or bytes) is a 40-character Z85 string (a 32-byte key)."""
    if value is None:
        return False
    try:
        text = _to_text(value)
    except Exception:
        return False
    return bool(isinstance(text, str) and Z85_KEY_RE.match(text))


def validate_z85_key(value, what, secret=False):
    """Return ``value`` as bytes if it is a Z85 CURVE key, else raise CurveKeyError.

    ``what`` names the key in the error message. The value itself is only
    mentioned for public keys, and then only its length.
    """
    if value is None or (isinstance(value, (str, bytes)) and len(value) == 0):
        raise CurveKeyError('%s is empty' % what)
    if not isinstance(value, (str, bytes)):
        raise CurveKeyError('%s must be a string' % what)
    if not is_z85_key(value):
        kind = 'secret' if secret else 'public'
        raise CurveKeyError(
            '%s is not a valid Z85-encoded CURVE %s key (expected 40 Z85 characters, got %d characters)'
            % (what, kind, len(value)))
    return _to_bytes(value)


def public_from_secret(secret_key):
    """Derive the public key (bytes, Z85) from a secret key, or None if libzmq cannot."""
    curve_public = getattr(zmq, 'curve_public', None)
    if curve_public is None:
        return None
    try:
        return curve_public(_to_bytes(secret_key))
    except Exception:
        return None


def has_curve():
    """True if the loaded libzmq supports CURVE."""
    try:
        return bool(zmq.has('curve'))
    except Exception:
        return False


def keypair_paths(directory, name):
    """Return (public_key_file, secret_key_file) for NAME in DIRECTORY."""
    base = os.path.join(directory, name)
    return base + PUBLIC_SUFFIX, base + SECRET_SUFFIX


#: Lock file of a key directory. A dotfile that does not end in ``.key``, so neither
#: ``zmq.auth.load_certificates`` nor a ``*.key``/``*.key_secret`` pattern picks it up.
LOCK_FILE_NAME = '.zmq_curve_keypair.lock'

#: Seconds ``keypair_lock`` waits for another run before it gives up.
LOCK_TIMEOUT = 60.0


def keypair_lock_path(directory):
    """Path of the lock file that serialises key pair changes in DIRECTORY."""
    return os.path.join(directory, LOCK_FILE_NAME)


class _LockTimeout(Exception):
    pass


def _try_flock(fd, operation):
    """flock(FD, OPERATION) without waiting: True when taken, False when held elsewhere."""
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
        return False


def _flock(fd, operation, timeout):
    """flock(FD, OPERATION), waiting at most TIMEOUT seconds (then _LockTimeout).

    A blocking flock queues in the kernel, so runs get the lock in turn and readers are not
    starved by writers. Its timeout is a SIGALRM timer, which only the main thread can use
    (modules always run there); elsewhere, or when that timer is in use, the lock is polled.
    """
    if _try_flock(fd, operation):
        return
    if timeout <= 0:
        raise _LockTimeout()
    if (threading.current_thread() is threading.main_thread() and hasattr(signal, 'setitimer')
            and signal.getitimer(signal.ITIMER_REAL)[0] == 0):  # never disturb a timer in use
        def on_alarm(signum, frame):
            raise _LockTimeout()
        previous = signal.signal(signal.SIGALRM, on_alarm)
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout)
            fcntl.flock(fd, operation)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        return
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        time.sleep(delay)
        if _try_flock(fd, operation):
            return
        if time.monotonic() >= deadline:
            raise _LockTimeout()
        delay = min(delay * 2, 0.01)


@contextlib.contextmanager
def keypair_lock(directory, exclusive=True, create=True, timeout=LOCK_TIMEOUT):
    """Hold ``fcntl.flock`` on DIRECTORY's lock file; yields True, or False if there is none.

    Writers take it exclusively (``create=True`` makes the empty 0600 lock file); readers
    take it shared without creating anything (``create=False``), and get False when no
    writer has ever made the lock file. Every pair in DIRECTORY shares the lock. The lock
    file is never removed (removing it would let two runs lock different files). It is
    released when the block ends, also on ``sys.exit`` and when the process dies.
    Raises CurveKeyError if the lock is not free within TIMEOUT seconds.
    """
    path = keypair_lock_path(directory)
    flags = getattr(os, 'O_CLOEXEC', 0) | getattr(os, 'O_NOFOLLOW', 0)
    fd = None
    try:
        try:
            if create:
                old_umask = os.umask(0o077)
                try:
                    fd = os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o600)
                except OSError as e:
                    if e.errno != errno.EACCES:
                        raise
                    fd = os.open(path, os.O_RDONLY | flags)  # someone else's lock file
                finally:
                    os.umask(old_umask)
            else:
                try:
                    fd = os.open(path, os.O_RDONLY | flags)
                except OSError as e:
                    if e.errno != errno.ENOENT:
                        raise
        except OSError as e:
            raise CurveKeyError('cannot open the lock file %s: %s' % (path, e.strerror))
        if fd is None:
            yield False
            return
        try:
            _flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH, timeout)
        except _LockTimeout:
            raise CurveKeyError('another run has held the lock %s for more than %g s' % (path, timeout))
        except OSError as e:
            raise CurveKeyError('cannot lock %s: %s' % (path, e.strerror))
        yield True
    finally:
        if fd is not None:
            os.close(fd)


def _fsync_path(path, directory=False):
    """fsync a file or a directory (best effort for directories, e.g. on some network file systems)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, 'O_CLOEXEC', 0))  # fsync needs no write access
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _load_certificate(path):
    """zmq.auth.load_certificate with errors that name the file but never its contents.

    Only regular files are read: opening a FIFO would block forever, a device could be endless.
    """
    if os.path.exists(path) and not os.path.isfile(path):
        raise CurveKeyError('%s is not a regular file' % path)
    try:
        return zmq.auth.load_certificate(path)
    except (IOError, OSError):
        raise CurveKeyError('cannot read certificate file %s' % path)
    except ValueError:
        raise CurveKeyError('%s is not a ZeroMQ certificate (no public-key found)' % path)
    except Exception as e:  # defensive: never leak file contents
        raise CurveKeyError('cannot parse certificate file %s (%s)' % (path, type(e).__name__))


def load_public_key(path):
    """Load and validate the public key of a certificate file; return bytes (Z85)."""
    public_key, _secret = _load_certificate(path)
    validate_z85_key(public_key, 'public key in %s' % path)
    return public_key


def load_secret_certificate(path):
    """Load and validate a secret certificate; return (public_key, secret_key) as bytes.

    Checks that both keys are present and well-formed and, when libzmq can
    derive it, that the public key belongs to the secret key.
    """
    public_key, secret_key = _load_certificate(path)
    validate_z85_key(public_key, 'public key in %s' % path)
    if not secret_key:
        raise CurveKeyError('%s contains no secret-key' % path)
    validate_z85_key(secret_key, 'secret key in %s' % path, secret=True)
    derived = public_from_secret(secret_key)
    if derived is not None and derived != public_key:
        raise CurveKeyError('the public key in %s does not belong to its secret key' % path)
    return public_key, secret_key


def inspect_keypair(directory, name):
    """Describe the key pair NAME in DIRECTORY without exposing the secret.

    Returns a dict with ``status`` ('absent', 'valid' or 'invalid'),
    ``public_key`` (text or None), ``public_exists``, ``secret_exists``,
    ``public_key_file``, ``secret_key_file`` and ``message`` (for 'invalid').
    """
    public_file, secret_file = keypair_paths(directory, name)
    info = dict(status='absent', public_key=None, message=None,
                public_key_file=public_file, secret_key_file=secret_file,
                public_exists=os.path.lexists(public_file),
                secret_exists=os.path.lexists(secret_file))
    if not info['public_exists'] and not info['secret_exists']:
        return info
    if info['public_exists'] != info['secret_exists']:
        missing = secret_file if info['public_exists'] else public_file
        info.update(status='invalid', message='half-present key pair: %s is missing' % missing)
        return info
    for path in (public_file, secret_file):
        if os.path.islink(path):
            # Modes and owners would be managed on the link, not on the file it points to.
            info.update(status='invalid', message='%s is a symlink (to %s), not a regular file'
                                                  % (path, os.readlink(path)))
            return info
        if not os.path.isfile(path):
            info.update(status='invalid', message='%s is not a regular file' % path)
            return info
    try:
        public_key = load_public_key(public_file)
        secret_public_key, _secret = load_secret_certificate(secret_file)
        _secret = None
    except CurveKeyError as e:
        info.update(status='invalid', message=str(e))
        return info
    if public_key != secret_public_key:
        info.update(status='invalid',
                    message='the public key in %s differs from the public key in %s'
                            % (public_file, secret_file))
        return info
    info.update(status='valid', public_key=_to_text(public_key))
    return info


def create_keypair(directory, name, prepare=None):
    """Create a new key pair NAME in DIRECTORY atomically; return the public key (text).

    The pair is written by ``zmq.auth.create_certificates`` into a private
    temporary directory inside DIRECTORY (umask 077, so the secret file is
    0600 from its creation). ``prepare(tmp_public_file, tmp_secret_file)``
    may then set final modes/owners; both files are fsynced and then moved
    into place with ``os.replace`` (secret first), replacing any existing pair
    (a symlink is replaced by the new file; its target is left alone), and the
    directory is fsynced.

    Two renames are not one atomic step: call this under ``keypair_lock``
    (exclusive) so that no other run writes or inspects the pair meanwhile.
    """
    public_file, secret_file = keypair_paths(directory, name)
    old_umask = os.umask(0o077)
    tmpdir = None
    try:
        tmpdir = tempfile.mkdtemp(prefix='.%s.tmp' % name, dir=directory)
        tmp_public, tmp_secret = zmq.auth.create_certificates(tmpdir, name)
        # Validate what was written before it replaces anything.
        public_key = load_public_key(tmp_public)
        secret_public, _secret = load_secret_certificate(tmp_secret)
        _secret = None
        if public_key != secret_public:  # pragma: no cover - would be a pyzmq bug
            raise CurveKeyError('generated key pair is inconsistent')
        if prepare is not None:
            prepare(tmp_public, tmp_secret)
        _fsync_path(tmp_secret)
        _fsync_path(tmp_public)
        os.replace(tmp_secret, secret_file)
        os.replace(tmp_public, public_file)
        _fsync_path(directory, directory=True)
        return _to_text(public_key)
    finally:
        os.umask(old_umask)
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


class CurveClientKeys(object):
    """Client-side CURVE key material; the secret is hidden from ``repr``/``str``."""

    __slots__ = ('public_key', 'secret_key', 'server_public_key', 'source')

    def __init__(self, public_key, secret_key, server_public_key=None, source=None):
        self.public_key = _to_bytes(public_key)
        self.secret_key = _to_bytes(secret_key)
        self.server_public_key = _to_bytes(server_public_key) if server_public_key else None
        self.source = source

    def __repr__(self):
        return 'CurveClientKeys(public_key=%r, secret_key=<hidden>, server_public_key=%r)' % (
            _to_text(self.public_key), _to_text(self.server_public_key))

    __str__ = __repr__


def client_keys_from_options(client_public_key, client_secret_key, server_public_key=None):
    """Validate Z85 options and return CurveClientKeys."""
    public_key = validate_z85_key(client_public_key, 'client_public_key')
    secret_key = validate_z85_key(client_secret_key, 'client_secret_key', secret=True)
    derived = public_from_secret(secret_key)
    if derived is not None and derived != public_key:
        raise CurveKeyError('client_public_key does not belong to client_secret_key')
    server_key = None
    if server_public_key:
        server_key = validate_z85_key(server_public_key, 'server_public_key')
    return CurveClientKeys(public_key, secret_key, server_key, source='options')


def client_keys_from_dir(certificates_dir, need_server_key=True, client_name=CLIENT_CERT_NAME):
    """Load client (and server public) keys from a certificates directory as the agents do.

    Uses ``client.key_secret`` (public + secret; ``CLIENT_NAME.key_secret`` for
    another client pair) and ``server.key``. If ``client.key`` exists it must
    hold the same public key as ``client.key_secret`` (that is the key a
    ThreadAuthenticator authorises).
    """
    if not os.path.isdir(certificates_dir):
        raise CurveKeyError('certificates_dir %s does not exist or is not a directory' % certificates_dir)
    client_public_file, client_secret_file = keypair_paths(certificates_dir, client_name)
    server_public_file = keypair_paths(certificates_dir, SERVER_CERT_NAME)[0]
    if not os.path.isfile(client_secret_file):
        raise CurveKeyError('%s %s' % (client_secret_file, 'is not a regular file'
                                       if os.path.exists(client_secret_file) else 'is missing'))
    public_key, secret_key = load_secret_certificate(client_secret_file)
    if os.path.exists(client_public_file):
        if load_public_key(client_public_file) != public_key:
            raise CurveKeyError('the public key in %s differs from the public key in %s'
                                % (client_public_file, client_secret_file))
    server_key = None
    if need_server_key or os.path.exists(server_public_file):
        if not os.path.isfile(server_public_file):
            raise CurveKeyError('%s %s' % (server_public_file, 'is not a regular file'
                                           if os.path.exists(server_public_file) else 'is missing'))
        server_key = load_public_key(server_public_file)
    return CurveClientKeys(public_key, secret_key, server_key, source=certificates_dir)


def apply_client_curve(sock, keys, server_public_key=None):
    """Configure ``sock`` as a CURVE client with ``keys``.

    ``server_public_key`` (Z85) overrides ``keys.server_public_key``.
    """
    server_key = _to_bytes(server_public_key) if server_public_key else keys.server_public_key
    if not server_key:
        raise CurveKeyError('no server public key for CURVE')
    sock.curve_secretkey = keys.secret_key
    sock.curve_publickey = keys.public_key
    sock.curve_serverkey = server_key
