"""JSON as QEMU reads and writes it: qobject/json-lexer.c, json-streamer.c, json-parser.c, qjson.c.

QMP input is a byte stream.  :class:`JSONLexer` cuts it into tokens with
QEMU's state machine (single-quoted strings are accepted, numbers and
keywords follow QEMU's grammar, a bad byte gives a ``JSON_ERROR`` token and
the lexer skips to the next structural or control character);
:class:`JSONMessageParser` (the streamer) groups tokens until braces and
brackets balance and hands each group to :func:`json_parser_parse`, which
builds Python values (dict, list, str, int, float, bool, None) or fails with
QEMU's ``JSON parse error, ...`` messages.  The streamer's limits are QEMU's
(64 MiB of tokens, 2 Mi tokens, nesting 1024).

Output: :func:`qobject_to_json` writes QEMU's compact or pretty form.  A
QDict is a hash table in QEMU, so its members come out in bucket order of
QEMU's ``tdb_hash`` (newest first within a bucket), not in insertion order;
:func:`qdict_keys` reproduces that order, so qblock's replies are byte for
byte what QEMU sends for the same members.  Non-ASCII and control characters
are written as ``\\uXXXX`` with upper-case hex digits, as qjson.c does.

Left out: ``%``-interpolation (json_parser_parse's va_list), which only C
callers use.  Differences: UTF-8 inside strings is checked with Python's
decoder plus QEMU's one exception (``\\xC0\\x80`` is a NUL); QEMU's
mod_utf8_codepoint may disagree on exotic byte sequences.
"""
from __future__ import annotations

import enum
from collections import deque
from typing import Any, Callable

from qblock.util.error import Error

__all__ = ["JSONTokenType", "JSONToken", "JSONLexer", "JSONMessageParser", "json_parser_parse",
           "qobject_from_json", "qobject_to_json", "qobject_to_json_pretty", "qdict_keys", "tdb_hash"]

MAX_TOKEN_SIZE = 64 << 20
MAX_TOKEN_COUNT = 2 << 20
MAX_NESTING = 1 << 10
QDICT_BUCKET_MAX = 512


class JSONTokenType(enum.Enum):
    JSON_LCURLY = "{"
    JSON_RCURLY = "}"
    JSON_LSQUARE = "["
    JSON_RSQUARE = "]"
    JSON_COLON = ":"
    JSON_COMMA = ","
    JSON_INTEGER = "integer"
    JSON_FLOAT = "float"
    JSON_KEYWORD = "keyword"
    JSON_STRING = "string"
    JSON_ERROR = "error"
    JSON_END_OF_INPUT = "end-of-input"


_T = JSONTokenType
_SINGLE = {ord("{"): _T.JSON_LCURLY, ord("}"): _T.JSON_RCURLY, ord("["): _T.JSON_LSQUARE,
           ord("]"): _T.JSON_RSQUARE, ord(":"): _T.JSON_COLON, ord(","): _T.JSON_COMMA}
_WHITESPACE = b" \t\r\n"
_DIGITS = b"0123456789"
_STRUCTURAL = b"[]{}:,"


class JSONToken:
    """One token: its type and its bytes (QEMU's JSONToken; the x/y position is not kept)."""

    __slots__ = ("type", "str")

    def __init__(self, type: JSONTokenType, text: bytes):
        self.type = type
        self.str = text

    def __repr__(self) -> str:
        return f"<JSONToken {self.type.name} {self.str!r}>"


# Lexer states (json-lexer.c's IN_*).  A state in _TERMINAL ends its token when a byte
# does not continue it; the byte is then read again from IN_START (QEMU's LOOKAHEAD).
IN_START = "IN_START"
IN_RECOVERY = "IN_RECOVERY"
IN_DQ_STRING = "IN_DQ_STRING"
IN_DQ_STRING_ESCAPE = "IN_DQ_STRING_ESCAPE"
IN_SQ_STRING = "IN_SQ_STRING"
IN_SQ_STRING_ESCAPE = "IN_SQ_STRING_ESCAPE"
IN_ZERO = "IN_ZERO"
IN_NONZERO_NUMBER = "IN_NONZERO_NUMBER"
IN_NEG_NONZERO_NUMBER = "IN_NEG_NONZERO_NUMBER"
IN_MANTISSA = "IN_MANTISSA"
IN_MANTISSA_DIGITS = "IN_MANTISSA_DIGITS"
IN_EXP_E = "IN_EXP_E"
IN_EXP_SIGN = "IN_EXP_SIGN"
IN_EXP_DIGITS = "IN_EXP_DIGITS"
IN_KEYWORD = "IN_KEYWORD"
IN_WHITESPACE = "IN_WHITESPACE"

_TERMINAL = {IN_ZERO: _T.JSON_INTEGER, IN_NONZERO_NUMBER: _T.JSON_INTEGER,
             IN_MANTISSA_DIGITS: _T.JSON_FLOAT, IN_EXP_DIGITS: _T.JSON_FLOAT,
             IN_KEYWORD: _T.JSON_KEYWORD, IN_WHITESPACE: None}


class JSONLexer:
    """QEMU's JSON lexer: bytes in, ``emit(type, text)`` out."""

    def __init__(self, emit: Callable[[JSONTokenType, bytes], None]):
        self.emit = emit
        self.state = IN_START
        self.token = bytearray()

    def _next_state(self, c: int) -> str | None:
        """The state after byte ``c``; None when ``c`` cannot continue the token."""
        s = self.state
        if s == IN_START:
            if c in _WHITESPACE:
                return IN_WHITESPACE
            if c == 0x22:
                return IN_DQ_STRING
            if c == 0x27:
                return IN_SQ_STRING
            if c == 0x30:
                return IN_ZERO
            if 0x31 <= c <= 0x39:
                return IN_NONZERO_NUMBER
            if c == 0x2D:
                return IN_NEG_NONZERO_NUMBER
            if 0x61 <= c <= 0x7A:
                return IN_KEYWORD
            return None
        if s in (IN_DQ_STRING, IN_SQ_STRING):
            if c < 0x20 or c >= 0xFE:
                return None
            if c == 0x5C:
                return IN_DQ_STRING_ESCAPE if s == IN_DQ_STRING else IN_SQ_STRING_ESCAPE
            return s
        if s in (IN_DQ_STRING_ESCAPE, IN_SQ_STRING_ESCAPE):
            if c < 0x20 or c >= 0xFE:
                return None
            return IN_DQ_STRING if s == IN_DQ_STRING_ESCAPE else IN_SQ_STRING
        if s == IN_NEG_NONZERO_NUMBER:
            return IN_ZERO if c == 0x30 else IN_NONZERO_NUMBER if c in _DIGITS else None
        if s == IN_ZERO:
            return IN_MANTISSA if c == 0x2E else IN_EXP_E if c in b"eE" else None
        if s == IN_NONZERO_NUMBER:
            if c in _DIGITS:
                return s
            return IN_MANTISSA if c == 0x2E else IN_EXP_E if c in b"eE" else None
        if s == IN_MANTISSA:
            return IN_MANTISSA_DIGITS if c in _DIGITS else None
        if s == IN_MANTISSA_DIGITS:
            return s if c in _DIGITS else IN_EXP_E if c in b"eE" else None
        if s == IN_EXP_E:
            return IN_EXP_SIGN if c in b"+-" else IN_EXP_DIGITS if c in _DIGITS else None
        if s in (IN_EXP_SIGN, IN_EXP_DIGITS):
            return IN_EXP_DIGITS if c in _DIGITS else None
        if s == IN_KEYWORD:
            return s if 0x61 <= c <= 0x7A else None
        if s == IN_WHITESPACE:
            return s if c in _WHITESPACE else None
        raise AssertionError(s)

    def feed_char(self, c: int) -> None:
        """One byte (json_lexer_feed_char); the closing quote of a string is handled by feed()."""
        while True:
            s = self.state
            if s == IN_RECOVERY:
                # Skip to a structural character, a control character or 0xFE/0xFF.
                if c in _STRUCTURAL or c < 0x20 or c >= 0xFE:
                    self.state = IN_START
                    continue
                return
            if s == IN_START and c in _SINGLE:
                self.emit(_SINGLE[c], bytes([c]))
                return
            nxt = self._next_state(c)
            if nxt is not None:
                self.token.append(c)
                self.state = nxt
                return
            if s in _TERMINAL and not (s == IN_ZERO and c in _DIGITS):  # "01" is an error, not "0" "1"
                typ = _TERMINAL[s]
                if typ is not None:
                    self.emit(typ, bytes(self.token))
                self.token.clear()
                self.state = IN_START
                continue  # LOOKAHEAD: read ``c`` again from the start state
            # Not a terminal state, or IN_START with an impossible byte: a JSON_ERROR
            # token holding what was read, the offending byte included.
            self.token.append(c)
            self.emit(_T.JSON_ERROR, bytes(self.token))
            self.token.clear()
            self.state = IN_RECOVERY
            return

    def feed(self, data: bytes) -> None:
        for c in data:
            if self.state in (IN_DQ_STRING, IN_SQ_STRING) and c == (0x22 if self.state == IN_DQ_STRING else 0x27):
                # The closing quote completes a JSON_STRING token.
                self.token.append(c)
                self.emit(_T.JSON_STRING, bytes(self.token))
                self.token.clear()
                self.state = IN_START
                continue
            self.feed_char(c)

    def flush(self) -> None:
        """End of input (json_lexer_flush): finish or fail the pending token, then JSON_END_OF_INPUT."""
        if self.state != IN_RECOVERY and self.state != IN_START:
            self.feed_char(0)
        self.state = IN_START
        self.token.clear()
        self.emit(_T.JSON_END_OF_INPUT, b"")


class JSONMessageParser:
    """The streamer: tokens until brackets balance, then one parsed value (json-streamer.c).

    ``emit(obj, err)`` gets the value, or None and an :class:`Error`.
    """

    def __init__(self, emit: Callable[[Any, Error | None], None]):
        self.emit = emit
        self.lexer = JSONLexer(self.json_message_process_token)
        self.brace_count = 0
        self.bracket_count = 0
        self.tokens: deque[JSONToken] = deque()
        self.token_size = 0

    def json_message_process_token(self, type: JSONTokenType, text: bytes) -> None:
        obj, err = None, None
        if type is _T.JSON_LCURLY:
            self.brace_count += 1
        elif type is _T.JSON_RCURLY:
            self.brace_count -= 1
        elif type is _T.JSON_LSQUARE:
            self.bracket_count += 1
        elif type is _T.JSON_RSQUARE:
            self.bracket_count -= 1
        elif type is _T.JSON_ERROR:
            err = Error("JSON parse error, stray '%s'" % text.decode("utf-8", "surrogateescape"))
            self._emit(None, err)
            return
        elif type is _T.JSON_END_OF_INPUT:
            if not self.tokens:
                return
            obj, err = _parse_or_error(self.tokens)
            self._emit(obj, err)
            return
        # Limits on memory and recursion depth one message may force.
        if self.token_size + len(text) + 1 > MAX_TOKEN_SIZE:
            self._emit(None, Error("JSON token size limit exceeded"))
            return
        if len(self.tokens) + 1 > MAX_TOKEN_COUNT:
            self._emit(None, Error("JSON token count limit exceeded"))
            return
        if self.bracket_count + self.brace_count > MAX_NESTING:
            self._emit(None, Error("JSON nesting depth limit exceeded"))
            return
        self.tokens.append(JSONToken(type, text))
        self.token_size += len(text)
        if (self.brace_count > 0 or self.bracket_count > 0) and self.brace_count >= 0 and self.bracket_count >= 0:
            return
        obj, err = _parse_or_error(self.tokens)
        self._emit(obj, err)

    def _emit(self, obj: Any, err: Error | None) -> None:
        self.brace_count = 0
        self.bracket_count = 0
        self.tokens = deque()
        self.token_size = 0
        self.emit(obj, err)

    def feed(self, data: bytes) -> None:
        """json_message_parser_feed."""
        self.lexer.feed(data)

    def flush(self) -> None:
        """json_message_parser_flush."""
        self.lexer.flush()


def _parse_or_error(tokens: deque[JSONToken]) -> tuple[Any, Error | None]:
    try:
        return json_parser_parse(tokens), None
    except Error as e:
        return None, e


# ---------------------------------------------------------------------------
# The parser (json-parser.c)


class _JSONParserContext:
    def __init__(self, tokens: deque[JSONToken]):
        self.buf = tokens
        self.err: Error | None = None

    def parse_error(self, msg: str) -> None:
        if self.err is None:  # the first error is the one reported
            self.err = Error(f"JSON parse error, {msg}")

    def peek(self) -> JSONToken | None:
        return self.buf[0] if self.buf else None

    def pop(self) -> JSONToken | None:
        return self.buf.popleft() if self.buf else None


_NO_VALUE = object()


def json_parser_parse(tokens: deque[JSONToken]) -> Any:
    """One JSON value from ``tokens``; raises Error (QEMU's message) when they do not form one."""
    ctxt = _JSONParserContext(tokens)
    result = _parse_value(ctxt)
    if ctxt.err is not None or result is _NO_VALUE:
        raise ctxt.err or Error("JSON parse error, expecting value")
    return result


def _parse_value(ctxt: _JSONParserContext) -> Any:
    token = ctxt.peek()
    if token is None:
        ctxt.parse_error("premature EOI")
        return _NO_VALUE
    t = token.type
    if t is _T.JSON_LCURLY:
        return _parse_object(ctxt)
    if t is _T.JSON_LSQUARE:
        return _parse_array(ctxt)
    if t in (_T.JSON_INTEGER, _T.JSON_FLOAT, _T.JSON_STRING):
        return _parse_literal(ctxt)
    if t is _T.JSON_KEYWORD:
        return _parse_keyword(ctxt)
    ctxt.parse_error("expecting value")
    return _NO_VALUE


def _parse_pair(ctxt: _JSONParserContext, d: dict) -> bool:
    if ctxt.peek() is None:
        ctxt.parse_error("premature EOI")
        return False
    key = _parse_value(ctxt)
    if key is _NO_VALUE or not isinstance(key, str):
        ctxt.parse_error("key is not a string in object")
        return False
    token = ctxt.pop()
    if token is None:
        ctxt.parse_error("premature EOI")
        return False
    if token.type is not _T.JSON_COLON:
        ctxt.parse_error("missing : in object pair")
        return False
    value = _parse_value(ctxt)
    if value is _NO_VALUE:
        return False
    if key in d:
        ctxt.parse_error("duplicate key")
        return False
    d[key] = value
    return True


def _parse_object(ctxt: _JSONParserContext) -> Any:
    ctxt.pop()  # '{'
    d: dict[str, Any] = {}
    peek = ctxt.peek()
    if peek is None:
        ctxt.parse_error("premature EOI")
        return _NO_VALUE
    if peek.type is _T.JSON_RCURLY:
        ctxt.pop()
        return d
    if not _parse_pair(ctxt, d):
        return _NO_VALUE
    token = ctxt.pop()
    while True:
        if token is None:
            ctxt.parse_error("premature EOI")
            return _NO_VALUE
        if token.type is _T.JSON_RCURLY:
            return d
        if token.type is not _T.JSON_COMMA:
            ctxt.parse_error("expected separator in dict")
            return _NO_VALUE
        if not _parse_pair(ctxt, d):
            return _NO_VALUE
        token = ctxt.pop()


def _parse_array(ctxt: _JSONParserContext) -> Any:
    ctxt.pop()  # '['
    lst: list[Any] = []
    peek = ctxt.peek()
    if peek is None:
        ctxt.parse_error("premature EOI")
        return _NO_VALUE
    if peek.type is _T.JSON_RSQUARE:
        ctxt.pop()
        return lst
    value = _parse_value(ctxt)
    if value is _NO_VALUE:
        ctxt.parse_error("expecting value")
        return _NO_VALUE
    lst.append(value)
    token = ctxt.pop()
    while True:
        if token is None:
            ctxt.parse_error("premature EOI")
            return _NO_VALUE
        if token.type is _T.JSON_RSQUARE:
            return lst
        if token.type is not _T.JSON_COMMA:
            ctxt.parse_error("expected separator in list")
            return _NO_VALUE
        value = _parse_value(ctxt)
        if value is _NO_VALUE:
            ctxt.parse_error("expecting value")
            return _NO_VALUE
        lst.append(value)
        token = ctxt.pop()


def _parse_keyword(ctxt: _JSONParserContext) -> Any:
    token = ctxt.pop()
    word = token.str.decode("ascii")
    if word == "true":
        return True
    if word == "false":
        return False
    if word == "null":
        return None
    ctxt.parse_error(f"invalid keyword '{word}'")
    return _NO_VALUE


_INT64_MIN, _UINT64_MAX = -(1 << 63), (1 << 64) - 1


def _parse_literal(ctxt: _JSONParserContext) -> Any:
    token = ctxt.pop()
    if token.type is _T.JSON_STRING:
        return _parse_string(ctxt, token)
    text = token.str.decode("ascii")
    if token.type is _T.JSON_INTEGER:
        # int64 if it fits, else uint64, else a double, as QEMU's QNum does.
        n = int(text)
        if _INT64_MIN <= n <= _UINT64_MAX:
            return n
    return float(text)


_ESCAPES = {ord('"'): '"', ord("'"): "'", ord("\\"): "\\", ord("/"): "/", ord("b"): "\b",
            ord("f"): "\f", ord("n"): "\n", ord("r"): "\r", ord("t"): "\t"}


def _cvt4hex(s: bytes) -> int:
    if len(s) < 4 or any(c not in b"0123456789abcdefABCDEF" for c in s[:4]):
        return -1
    return int(s[:4], 16)


def _parse_string(ctxt: _JSONParserContext, token: JSONToken) -> Any:
    raw = token.str
    quote = raw[0]
    out: list[str] = []
    i = 1
    n = len(raw) - 1  # the closing quote
    while i < n:
        c = raw[i]
        if c == quote:
            break
        if c == 0x5C:
            e = raw[i + 1] if i + 1 < len(raw) else 0
            if e in _ESCAPES:
                out.append(_ESCAPES[e])
                i += 2
                continue
            if e != ord("u"):
                ctxt.parse_error("invalid escape sequence in string")
                return _NO_VALUE
            cp = _cvt4hex(raw[i + 2:i + 6])
            consumed = 6
            if 0xD800 <= cp <= 0xDBFF:
                # A high surrogate must be followed by an escaped low surrogate.
                lo = _cvt4hex(raw[i + 8:i + 12]) if raw[i + 6:i + 8] == b"\\u" else -1
                cp = 0x10000 + ((cp & 0x3FF) << 10) + (lo & 0x3FF) if 0xDC00 <= lo <= 0xDFFF else -1
                consumed = 12
            elif 0xDC00 <= cp <= 0xDFFF:
                cp = -1
            if cp < 0:
                text = raw[i:i + 6].decode("utf-8", "surrogateescape")
                ctxt.parse_error(f"{text} is not a valid Unicode character")
                return _NO_VALUE
            out.append(chr(cp))
            i += consumed
            continue
        if c < 0x80:
            out.append(chr(c))
            i += 1
            continue
        # A multi-byte UTF-8 sequence; QEMU's modified UTF-8 also takes C0 80 for NUL.
        if raw[i:i + 2] == b"\xc0\x80":
            out.append("\x00")
            i += 2
            continue
        length = 2 if 0xC2 <= c <= 0xDF else 3 if 0xE0 <= c <= 0xEF else 4 if 0xF0 <= c <= 0xF4 else 0
        try:
            if not length:
                raise UnicodeDecodeError("utf-8", raw, i, i + 1, "bad lead byte")
            out.append(raw[i:i + length].decode("utf-8"))
        except UnicodeDecodeError:
            ctxt.parse_error("invalid UTF-8 sequence in string")
            return _NO_VALUE
        i += length
    return "".join(out)


def qobject_from_json(text: str | bytes) -> Any:
    """Parse one JSON value from a whole string (qobject_from_json); raises Error."""
    result: list[Any] = []
    errors: list[Error] = []

    def emit(obj: Any, err: Error | None) -> None:
        if err is not None:
            errors.append(err)
        elif result:
            errors.append(Error("JSON parse error, expecting value"))  # more than one value
        else:
            result.append(obj)

    parser = JSONMessageParser(emit)
    parser.feed(text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text)
    parser.flush()
    if errors:
        raise errors[0]
    if not result:
        raise Error("Expecting a JSON value")
    return result[0]


# ---------------------------------------------------------------------------
# Output (qjson.c) in QDict order (qdict.c)


def tdb_hash(name: str) -> int:
    """QDict's hash of a key (qdict.c: tdb_hash), as a 32-bit unsigned value."""
    b = name.encode("utf-8")
    value = (0x238F13AF * len(b)) & 0xFFFFFFFF
    for i, c in enumerate(b):
        value = (value + (c << (i * 5 % 24))) & 0xFFFFFFFF
    return (1103515243 * value + 12345) & 0xFFFFFFFF


def qdict_keys(d: dict[str, Any]) -> list[str]:
    """The keys of ``d`` in the order QEMU's qdict_first/qdict_next visit them.

    Buckets in index order; within a bucket the most recently inserted key first.
    """
    pos = {k: i for i, k in enumerate(d)}
    return sorted(d, key=lambda k: (tdb_hash(k) % QDICT_BUCKET_MAX, -pos[k]))


def _to_json_str(s: str, accu: list[str]) -> None:
    accu.append('"')
    for ch in s:
        cp = ord(ch)
        if ch == '"':
            accu.append('\\"')
        elif ch == "\\":
            accu.append("\\\\")
        elif ch == "\b":
            accu.append("\\b")
        elif ch == "\f":
            accu.append("\\f")
        elif ch == "\n":
            accu.append("\\n")
        elif ch == "\r":
            accu.append("\\r")
        elif ch == "\t":
            accu.append("\\t")
        elif 0x20 <= cp <= 0x7E:
            accu.append(ch)
        elif 0xDC80 <= cp <= 0xDCFF:
            accu.append("\\uFFFD")  # an undecodable byte (surrogateescape), as QEMU writes invalid UTF-8
        elif cp > 0xFFFF:
            cp -= 0x10000
            accu.append("\\u%04X\\u%04X" % (0xD800 | (cp >> 10), 0xDC00 | (cp & 0x3FF)))
        else:
            accu.append("\\u%04X" % cp)
    accu.append('"')


def _newline(accu: list[str], pretty: bool, indent: int) -> None:
    if pretty:
        accu.append("\n" + "    " * indent)


def _to_json(obj: Any, pretty: bool, indent: int, accu: list[str]) -> None:
    if obj is None:
        accu.append("null")
    elif obj is True:
        accu.append("true")
    elif obj is False:
        accu.append("false")
    elif isinstance(obj, int):
        accu.append(str(obj))
    elif isinstance(obj, float):
        accu.append("%.17g" % obj)
    elif isinstance(obj, str):
        _to_json_str(obj, accu)
    elif isinstance(obj, dict):
        accu.append("{")
        for i, key in enumerate(qdict_keys(obj)):
            if i:
                accu.append("," if pretty else ", ")
            _newline(accu, pretty, indent + 1)
            _to_json_str(key, accu)
            accu.append(": ")
            _to_json(obj[key], pretty, indent + 1, accu)
        _newline(accu, pretty, indent)
        accu.append("}")
    elif isinstance(obj, (list, tuple)):
        accu.append("[")
        for i, item in enumerate(obj):
            if i:
                accu.append("," if pretty else ", ")
            _newline(accu, pretty, indent + 1)
            _to_json(item, pretty, indent + 1, accu)
        _newline(accu, pretty, indent)
        accu.append("]")
    else:
        raise TypeError(f"qobject_to_json: cannot write {type(obj).__name__}")


def qobject_to_json_pretty(obj: Any, pretty: bool) -> str:
    accu: list[str] = []
    _to_json(obj, pretty, 0, accu)
    return "".join(accu)


def qobject_to_json(obj: Any) -> str:
    """``obj`` as QEMU's compact JSON, dict members in QDict order."""
    return qobject_to_json_pretty(obj, False)
