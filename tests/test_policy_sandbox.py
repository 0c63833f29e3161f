"""The Lua sandbox and the ParseURL helper, run in-process through LuaHost.

LuaHost is exactly what the worker process runs (mxsend/luasandbox.py); testing it
directly keeps these table-driven tests fast.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mxsend.actions import FILE_FIELDS, FileActions
from mxsend.luasandbox import LuaHost, compile_check, new_runtime
from mxsend.luavalues import field_names, file_actions_to_lua

NAMES = field_names()
DEFAULTS = file_actions_to_lua(FileActions())
# Where Reason's value is in check_file's reply: ("ok", nil, then (type, value) per field).
REASON = 3 + 2 * [lua for _, lua in FILE_FIELDS].index("Reason")

PROBE = b"""
function CheckFile(Filename, Actions)
  local ok, value = pcall(function() %s end)
  Actions.Reason = tostring(ok) .. ":" .. tostring(value)
  return Actions
end
"""


def probe(body: str) -> str:
    """Run `body` inside CheckFile under pcall; 'true:<value>' or 'false:<error>'."""
    host = LuaHost(16 * 1024**2)
    error, _ = host.load(PROBE % body.encode(), "@probe.lua", 1.0, NAMES)
    assert error is None, error
    values, _ = host.check_file(1.0, b"/f", 1, b"", 0, b"", b"", b"", b"\r\n", *DEFAULTS)
    assert values[0] == b"ok", values
    reason = values[REASON]
    assert isinstance(reason, bytes)
    return reason.decode()


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # lupa's own bridge to Python and the usual ways to reach it.
        ("return python", "true:nil"),
        ("return python.eval('1')", "false:"),
        ("return _G.python", "true:nil"),
        ("return rawget(_G, 'python')", "true:nil"),
        ("return _ENV.python", "true:nil"),
        ("return load('return python')()", "true:nil"),
        ("return load('return debug')()", "true:nil"),
        # Libraries and functions that are not there.
        ("return debug", "true:nil"),
        ("return package", "true:nil"),
        ("return require", "true:nil"),
        ("return dofile", "true:nil"),
        ("return loadfile", "true:nil"),
        ("return os.execute", "true:nil"),
        ("return os.remove", "true:nil"),
        ("return os.rename", "true:nil"),
        ("return os.exit", "true:nil"),
        ("return os.tmpname", "true:nil"),
        ("return io.popen", "true:nil"),
        ("return io.write", "true:nil"),
        ("return io.lines", "true:nil"),
        ("return string.dump", "true:nil"),
        ("return getmetatable('').__index", "false:"),
        ("return getmetatable('')", "true:false"),
        # Bytecode is refused, text still loads.
        ("local f, e = load(string.char(27) .. 'LuaR') return e", "true:"),
        ("return load('return 1 + 1')()", "true:2"),
        ("return load(function() return nil end) ~= nil", "true:true"),
        # What is there.
        ("return type(os.time()) .. type(os.date('%Y')) .. type(os.clock())",
         "true:numberstringnumber"),
        ("return os.difftime(10, 4)", "true:6"),
        ("return bit32.band(12, 10)", "true:8"),
        ("return string.format('%5.1f', 3.14159)", "true:  3.1"),
        ("return math.floor(7 / 2)", "true:3"),
        ("return 7 / 2", "true:3.5"),
        ("return table.concat({1, 2, 3}, '-')", "true:1-2-3"),
        ("return select('#', table.unpack({1, 2, 3}))", "true:3"),
        ("return _VERSION", "true:Lua 5.2"),
        ("return collectgarbage('count') > 0", "true:true"),
        ("return collectgarbage('stop')", "false:"),
        ("return io.open('/etc/passwd', 'w')", "false:"),
        ("return io.open('/etc/passwd', 'r+')", "false:"),
        ("return io.open('/etc/passwd', 'a')", "false:"),
    ],
)
def test_sandbox(body: str, expected: str) -> None:
    assert probe(body).startswith(expected)


def test_io_open_reads(tmp_path: Path) -> None:
    path = tmp_path / "list.txt"
    path.write_text("first line\nsecond\n")
    assert probe(f"local f = io.open('{path}') local l = f:read('*l') f:close() return l") \
        == "true:first line"
    # A read-only handle cannot be written through either.
    result = probe(f"local f = io.open('{path}', 'rb') return f:write('x')")
    assert result.startswith("true:nil") or result.startswith("false:")
    assert path.read_text() == "first line\nsecond\n"


def test_os_getenv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MXSEND_TEST_VALUE", "visible")
    assert probe("return os.getenv('MXSEND_TEST_VALUE')") == "true:visible"


def test_bytecode_chunk_is_refused_at_load() -> None:
    error = compile_check(b"\x1bLuaR\x00", "@mxout.lua")
    assert error is not None and "binary" in error


def test_attribute_filter_blocks_python_objects() -> None:
    """Defence in depth: if a Python object ever reached Lua, it would be opaque."""
    runtime = new_runtime(8 * 1024**2)

    class Secret:
        value = 42

    runtime.globals()["obj"] = Secret()
    check = runtime.eval("function(expr) return pcall(load('return ' .. expr)) end")
    for expression in ("obj.value", "obj.__class__", "obj.__init__.__globals__",
                       "python.builtins", "python.eval"):
        ok, _ = check(expression.encode())
        assert ok is False or _ is None, expression
    # register_builtins=False and register_eval=False: nothing to call.
    assert runtime.eval("python.builtins") is None
    assert runtime.eval("python.eval") is None


def test_print_is_bounded() -> None:
    host = LuaHost(16 * 1024**2)
    host.load(b"function CheckFile(f, a) for i = 1, 1000 do print(string.rep('x', 5000)) end "
              b"return a end", "@p.lua", 1.0, NAMES)
    _, prints = host.check_file(1.0, b"/f", 1, b"", 0, b"", b"", b"", b"\r\n", *DEFAULTS)
    assert len(prints) == 100
    assert all(len(line) <= 2003 for line in prints)


# --- ParseURL --------------------------------------------------------------------------

PARSE = b"""
function CheckFile(Filename, Actions)
  local u = ParseURL(Filename)
  local out = {}
  for _, k in ipairs({"scheme", "user", "password", "host", "port", "path", "query",
                      "fragment"}) do
    if u[k] ~= nil then out[#out + 1] = k .. "=" .. tostring(u[k]) .. ":" .. type(u[k]) end
  end
  Actions.Reason = table.concat(out, " ")
  return Actions
end
"""


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("smtp://user:secret@mail.example.com:587/path/x?a=1&b=2#top",
         "scheme=smtp:string user=user:string password=secret:string "
         "host=mail.example.com:string port=587:number path=/path/x:string "
         "query=a=1&b=2:string fragment=top:string"),
        ("HTTP://Example.COM", "scheme=http:string host=Example.COM:string"),
        ("http://[2001:db8::1]:8080/x", "scheme=http:string host=2001:db8::1:string "
         "port=8080:number path=/x:string"),
        ("http://[::1]", "scheme=http:string host=::1:string"),
        ("[::1]:25", "host=::1:string port=25:number"),
        ("mail.example.com", "host=mail.example.com:string"),
        ("mail.example.com:25", "host=mail.example.com:string port=25:number"),
        ("//host.example/p", "host=host.example:string path=/p:string"),
        ("mailto:bob@example.com", "scheme=mailto:string path=bob@example.com:string"),
        ("https://user@host", "scheme=https:string user=user:string host=host:string"),
        ("https://:pw@host", "scheme=https:string user=:string password=pw:string "
         "host=host:string"),
        ("https://a@b@host", "scheme=https:string user=a@b:string host=host:string"),
        ("http://host:/p", "scheme=http:string host=host:string path=/p:string"),
        ("http://host:abc", "scheme=http:string host=host:string port=abc:string"),
        ("http://host?#", "scheme=http:string host=host:string query=:string "
         "fragment=:string"),
        ("http://", "scheme=http:string"),
        ("/just/a/path", "path=/just/a/path:string"),
        ("?q", "query=q:string"),
        ("", ""),
    ],
)
def test_parse_url(url: str, expected: str) -> None:
    host = LuaHost(16 * 1024**2)
    assert host.load(PARSE, "@parse.lua", 1.0, NAMES)[0] is None
    values, _ = host.check_file(1.0, url.encode(), 1, b"", 0, b"", b"", b"", b"\r\n", *DEFAULTS)
    assert values[REASON] == expected.encode()


def test_parse_url_of_a_non_string() -> None:
    assert probe("local n = 0 for _ in pairs(ParseURL(nil)) do n = n + 1 end return n") \
        == "true:0"
