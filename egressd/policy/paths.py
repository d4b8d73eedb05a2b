"""The path grammar of a host rule's ``http.allow[].paths`` (pure).

A pattern is an absolute path of ``/``-separated segments:

* a literal segment matches exactly that text (case-sensitive). It is
  written decoded and may hold RFC 3986 ``pchar`` characters other than
  ``%``: letters, digits and ``-._~!$&'()+,;=:@``;
* ``*`` matches exactly one non-empty segment (any text);
* a trailing ``/**`` matches any rest, none included: ``/data/**`` matches
  ``/data``, ``/data/``, ``/data/a`` and ``/data/a/b``; ``/**`` matches
  every path. ``**`` anywhere else is rejected;
* ``/`` alone matches only ``/``; a single trailing ``/`` is a literal
  (``/data/`` matches ``/data/``, not ``/data``); other empty segments
  (``//``), ``.`` and ``..`` segments, ``?``, ``#``, ``%``, ``\\`` and partial
  wildcards (``/a*``) are rejected.

A request's path is what is compared (`request_path`): the path of an
origin-form (``/a/b?q``) or absolute-form (``http://h/a/b?q``) target, the
query (and a fragment, which a client should not send) stripped. Each segment
is percent-decoded before matching, so ``/d%61ta`` is ``/data``. Because a
server and the proxy must not see two different paths in the same bytes,
what servers resolve differently is refused rather than guessed between
(``http_malformed``): invalid percent-escapes; a dot segment, literal or
encoded (``/a/../b``, ``/a/%2e%2e/b``), including one followed by a
``;parameter`` (``/..;/``: Tomcat resolves it); an encoded ``/``, ``\\`` or
NUL (``%2F``, ``%5C``, ``%00``); a raw ``\\``; bytes outside printable ASCII.
Empty segments are kept as they are, not collapsed: ``//data`` does not match
``/data``, and ``*`` never matches an empty segment. The asterisk-form target
(``OPTIONS *``) and an authority-form one (``CONNECT``) have no path: no path
pattern matches them.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

#: The most characters in one path pattern.
MAX_PATH_PATTERN = 1024

ANY_SEGMENT = "*"
ANY_REST = "**"

_LITERAL_SEGMENT = re.compile(r"[A-Za-z0-9\-._~!$&'()+,;=:@]+")
_HEX = frozenset("0123456789abcdefABCDEF")
_DOT_SEGMENTS = frozenset({".", ".."})


class PathPatternError(ValueError):
    """A path pattern outside the grammar; the message says why."""


@dataclass(frozen=True, slots=True)
class PathPattern:
    """A parsed pattern: its segments, and whether a trailing ``/**`` ends it."""

    text: str
    segments: tuple[str, ...]
    rest: bool

    def matches(self, path: tuple[str, ...]) -> bool:
        """Whether decoded request segments `path` (from `request_path`) match."""
        if not path:
            return False  # a target without a path ("*", an authority)
        segments = self.segments
        n = len(segments)
        if self.rest:
            if len(path) < n:
                return False
        elif len(path) != n:
            return False
        for want, got in zip(segments, path, strict=False):
            if want == ANY_SEGMENT:
                if not got:
                    return False
            elif want != got:
                return False
        return True


def parse_path_pattern(text: str) -> PathPattern:
    """`text` as a `PathPattern`; raises `PathPatternError`."""
    if not text.startswith("/"):
        raise PathPatternError("must start with '/'")
    if len(text) > MAX_PATH_PATTERN:
        raise PathPatternError(f"longer than {MAX_PATH_PATTERN} characters")
    if text == "/":
        return PathPattern(text, ("",), rest=False)
    parts = text[1:].split("/")
    rest = parts[-1] == ANY_REST
    if rest:
        parts.pop()
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        if part == ANY_SEGMENT:
            continue
        if part == ANY_REST:
            raise PathPatternError("'**' is allowed only as the last segment ('/a/**')")
        if not part:
            if last and not rest and index > 0:
                continue  # one trailing slash: a literal
            raise PathPatternError("empty segment ('//')")
        if part in _DOT_SEGMENTS:
            raise PathPatternError(f"dot segment {part!r}")
        if "*" in part:
            raise PathPatternError(f"'*' must be a whole segment, not part of {part!r}")
        if not _LITERAL_SEGMENT.fullmatch(part):
            raise PathPatternError(
                f"segment {part!r}: only letters, digits and -._~!$&'()+,;=:@ "
                "(write it decoded; no %, ?, #, \\)"
            )
    return PathPattern(text, tuple(parts), rest)


@functools.lru_cache(maxsize=4096)
def compiled(text: str) -> PathPattern:
    """`parse_path_pattern` memoised (patterns come from validated policies)."""
    return parse_path_pattern(text)


def request_path(target: str) -> tuple[str, ...] | None:
    """The decoded segments of a request target's path (``/a/b`` -> ``("a", "b")``),
    ``()`` for a target without a path (``*``, authority-form), None when the
    path is one the proxy refuses to interpret (see the module docstring)."""
    if target.startswith("/"):
        path = target
    else:
        scheme = target.find("://")
        if scheme <= 0:
            return ()  # asterisk-form or authority-form: no path
        rest = target[scheme + 3 :]
        slash = rest.find("/")
        query = rest.find("?")
        if slash == -1 or (query != -1 and query < slash):
            path = "/"  # RFC 9112 3.2.2: an empty path is "/"
        else:
            path = rest[slash:]
    for cut in ("?", "#"):
        at = path.find(cut)
        if at != -1:
            path = path[:at]
    if "\\" in path or not path.isascii() or not path.isprintable():
        return None
    segments: list[str] = []
    for raw in path[1:].split("/"):
        segment = _decode(raw)
        if segment is None:
            return None
        if segment.split(";", 1)[0] in _DOT_SEGMENTS:
            return None
        segments.append(segment)
    return tuple(segments)


def _decode(raw: str) -> str | None:
    if "%" not in raw:
        return raw
    out = bytearray()
    i = 0
    n = len(raw)
    while i < n:
        char = raw[i]
        if char != "%":
            out += char.encode("ascii")
            i += 1
            continue
        pair = raw[i + 1 : i + 3]
        if len(pair) != 2 or not set(pair) <= _HEX:
            return None
        byte = int(pair, 16)
        if byte in (0x00, 0x2F, 0x5C):
            return None  # NUL, '/', '\': servers split or stop on these differently
        out.append(byte)
        i += 3
    return out.decode("utf-8", errors="surrogateescape")


def path_text(target: str) -> str:
    """The path of a request target without its query, for audit events."""
    if not target.startswith("/"):
        scheme = target.find("://")
        if scheme <= 0:
            return target
        rest = target[scheme + 3 :]
        slash = rest.find("/")
        target = rest[slash:] if slash != -1 else "/"
    for cut in ("?", "#"):
        at = target.find(cut)
        if at != -1:
            target = target[:at]
    return target or "/"
