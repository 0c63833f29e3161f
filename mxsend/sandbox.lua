-- The Lua side of mxsend's policy worker (mxsend/luasandbox.py runs this once per
-- script version, in a fresh Lua 5.2 state).
--
-- Rules of this file:
--   * It runs with the full standard library, then hands the script a separate
--     environment holding only the whitelist of contract §4. Everything the sandbox must
--     not reach (debug, package, the lupa `python` table, the real globals) stays in
--     this file's locals, which the script cannot see: there is no `debug` to walk
--     upvalues with.
--   * Runaway Lua code is stopped by a count hook that checks a CPU-time deadline. In
--     Lua 5.2 a new coroutine does not run its creator's Lua hook function, so the
--     sandbox's coroutine.create/wrap install the hook on every coroutine they make.
--   * A C function (a pathological string pattern, a read from a FIFO) cannot be
--     interrupted by a hook; the daemon kills the whole worker process for that.
--   * Values cross to Python only as nil, booleans, numbers and strings.

local debug_sethook = debug.sethook
local os_clock = os.clock
local error, type, pcall, select, tostring, setmetatable, rawget, rawset, next =
      error, type, pcall, select, tostring, setmetatable, rawget, rawset, next
local s_lower, s_find, s_sub, s_gmatch, s_match = string.lower, string.find, string.sub,
      string.gmatch, string.match
local t_concat = table.concat
local co_create, co_resume, co_status, co_running, co_yield =
      coroutine.create, coroutine.resume, coroutine.status, coroutine.running, coroutine.yield
local real_load = load
local io_open = io.open

-- Instructions between two deadline checks: a check costs a C call and a clock read;
-- 1000 instructions are a few microseconds of Lua, so a timeout is seen promptly.
local HOOK_COUNT = 1000
local TIMEOUT_MESSAGE = "script timed out"

local deadline = math.huge
local expired = false

local debug_getinfo = debug.getinfo
local HOST_SOURCE = debug_getinfo(1, "S").source

local hook
hook = function()
  -- This file's own code (disarming after a timeout) is never interrupted.
  if expired and debug_getinfo(2, "S").source == HOST_SOURCE then return end
  if expired or os_clock() > deadline then
    -- Once expired, check at every instruction: a script that catches the error with
    -- pcall and loops on meets it again at its very next instruction, outside the
    -- pcall, so it cannot outlive its deadline.
    if not expired then
      expired = true
      debug_sethook(hook, "", 1)
    end
    error(TIMEOUT_MESSAGE, 0)
  end
end

local function arm(seconds)
  expired = false
  deadline = os_clock() + seconds
  debug_sethook(hook, "", HOOK_COUNT)
end

local function disarm()
  debug_sethook()
  deadline = math.huge
end
-- (`expired` stays set until the next arm() so the caller can see what happened.)

-- print() goes to the daemon log as script_log events; bounded so a chatty loop cannot
-- flood the log or the pipe.
local MAX_PRINTS, MAX_PRINT_LEN = 100, 2000
local prints, nprints = {}, 0

local function sandbox_print(...)
  if nprints >= MAX_PRINTS then return end
  local parts = {}
  for i = 1, select("#", ...) do
    parts[i] = tostring((select(i, ...)))
  end
  local line = t_concat(parts, "\t")
  if #line > MAX_PRINT_LEN then line = s_sub(line, 1, MAX_PRINT_LEN) .. "..." end
  nprints = nprints + 1
  prints[nprints] = line
end

local function take_prints()
  local out = prints
  prints, nprints = {}, 0
  return out
end

-- coroutine library whose coroutines carry the deadline hook.
local function sandbox_co_create(f)
  local co = co_create(f)
  debug_sethook(co, hook, "", HOOK_COUNT)
  return co
end

local function wrap_results(ok, ...)
  if ok then return ... end
  local err = ...
  if type(err) == "string" then error(err, 2) end
  error(err, 0)
end

local function sandbox_co_wrap(f)
  local co = sandbox_co_create(f)
  return function(...) return wrap_results(co_resume(co, ...)) end
end

-- io.open for reading only: the script may consult a file, never change one.
local function sandbox_io_open(name, mode)
  mode = mode or "r"
  if type(mode) ~= "string" or not s_match(mode, "^r[b]?$") then
    error("io.open: only read modes (\"r\", \"rb\") are allowed", 2)
  end
  return io_open(name, mode)
end

local function copy(t, names)
  local out = {}
  for _, name in ipairs(names) do out[name] = t[name] end
  return out
end

-- ParseURL(url) -> {scheme=, user=, password=, host=, port=, path=, query=, fragment=}
-- (RFC 3986 §3 components; parts that are absent are nil). An IPv6 host is returned
-- without its brackets; a numeric port is a number.
local function parse_url(url)
  if type(url) ~= "string" then return {} end
  local out = {}
  local rest = url
  local fragment_at = s_find(rest, "#", 1, true)
  if fragment_at then
    out.fragment = s_sub(rest, fragment_at + 1)
    rest = s_sub(rest, 1, fragment_at - 1)
  end
  local query_at = s_find(rest, "?", 1, true)
  if query_at then
    out.query = s_sub(rest, query_at + 1)
    rest = s_sub(rest, 1, query_at - 1)
  end
  local scheme, after = s_match(rest, "^([%a][%w+.-]*):(.*)$")
  -- "host:25" is a host and port, not scheme "host": a scheme is only taken when it is
  -- followed by "//" or when what follows is not all digits.
  if scheme and (s_sub(after, 1, 2) == "//" or not s_match(after, "^%d*$")) then
    out.scheme = s_lower(scheme)
    rest = after
  end
  local authority
  if s_sub(rest, 1, 2) == "//" then
    rest = s_sub(rest, 3)
    local slash = s_find(rest, "/", 1, true)
    if slash then
      authority, rest = s_sub(rest, 1, slash - 1), s_sub(rest, slash)
    else
      authority, rest = rest, ""
    end
  elseif not out.scheme then
    -- No scheme and no "//": "host[:port][/path]", as people write mail servers.
    local slash = s_find(rest, "/", 1, true)
    if slash ~= 1 then
      if slash then
        authority, rest = s_sub(rest, 1, slash - 1), s_sub(rest, slash)
      else
        authority, rest = rest, ""
      end
    end
  end
  if authority then
    local at = nil
    for i = #authority, 1, -1 do
      if s_sub(authority, i, i) == "@" then at = i break end
    end
    if at then
      local userinfo = s_sub(authority, 1, at - 1)
      authority = s_sub(authority, at + 1)
      local colon = s_find(userinfo, ":", 1, true)
      if colon then
        out.user = s_sub(userinfo, 1, colon - 1)
        out.password = s_sub(userinfo, colon + 1)
      else
        out.user = userinfo
      end
    end
    local host, port
    if s_sub(authority, 1, 1) == "[" then
      host, port = s_match(authority, "^%[([^%]]*)%]:?(.*)$")
      if not host then host, port = authority, "" end
    else
      host, port = s_match(authority, "^([^:]*):?(.*)$")
    end
    if host ~= "" then out.host = host end
    if port ~= "" then out.port = tonumber(port) or port end
  end
  if rest ~= "" then out.path = rest end
  return out
end

-- The environment a script sees (contract §4).
local env = {}
local safe_string = string
safe_string.dump = nil            -- bytecode is never produced...
local function sandbox_load(chunk, name, mode, ...)
  -- ...nor loaded: text only, and by default into the sandbox, not the real globals
  -- (an explicit env argument, even nil, is honoured as Lua 5.2's load does).
  if select("#", ...) >= 1 then
    return real_load(chunk, name, "t", (...))
  end
  return real_load(chunk, name, "t", env)
end

for _, name in ipairs({
  "assert", "error", "getmetatable", "ipairs", "next", "pairs", "pcall", "rawequal",
  "rawget", "rawlen", "rawset", "select", "setmetatable", "tonumber", "tostring", "type",
  "xpcall", "_VERSION",
}) do
  env[name] = _G[name]
end
env.load = sandbox_load
env.print = sandbox_print
env.ParseURL = parse_url
env.collectgarbage = function(opt, arg)
  -- "count" and "collect"/"step" are harmless; stopping the collector is not allowed.
  opt = opt or "collect"
  if opt == "count" or opt == "collect" or opt == "step" then
    return collectgarbage(opt, arg)
  end
  error("collectgarbage: option '" .. tostring(opt) .. "' is not allowed", 2)
end
env.string = safe_string
env.table = copy(table, {"concat", "insert", "pack", "remove", "sort", "unpack"})
env.math = copy(math, {
  "abs", "acos", "asin", "atan", "atan2", "ceil", "cos", "cosh", "deg", "exp", "floor",
  "fmod", "frexp", "huge", "ldexp", "log", "max", "min", "modf", "pi", "pow", "rad",
  "random", "randomseed", "sin", "sinh", "sqrt", "tan", "tanh",
})
env.bit32 = copy(bit32, {
  "arshift", "band", "bnot", "bor", "btest", "bxor", "extract", "lrotate", "lshift",
  "replace", "rrotate", "rshift",
})
env.os = copy(os, {"time", "date", "clock", "difftime", "getenv"})
env.io = {open = sandbox_io_open}
env.coroutine = {
  create = sandbox_co_create, resume = co_resume, running = co_running,
  status = co_status, wrap = sandbox_co_wrap, yield = co_yield,
}
env._G = env

-- The shared string metatable is reachable from any string ("x"):len(); lock it so a
-- script cannot swap string methods under this file or learn what else is there.
getmetatable("").__metatable = false

-- Nothing of the host stays reachable by name from the real globals either.
python = nil
debug = nil
package = nil
require = nil
dofile = nil
loadfile = nil

local host = {}

-- VPOP3 8.8's globals (contract §9), set before the script's top level runs so that
-- it can read them too.
function host.set_globals(connection_id, connection_name)
  env.ConnectionId = connection_id
  env.ConnectionName = connection_name
end

-- Which of the functions the daemon may call the loaded script defines (a comma list),
-- so that an optional hook the script lacks costs no round trip at all.
function host.functions(joined)
  local out, n = {}, 0
  for name in s_gmatch(joined, "[^,]+") do
    local fn = env[name]
    if type(fn) == "function" or (type(fn) == "table" and getmetatable(fn)) then
      n = n + 1
      out[n] = name
    end
  end
  return t_concat(out, ",")
end

-- Compile and run the script's top level. Returns true, or false and the message.
function host.load(source, chunkname, seconds)
  local chunk, err = real_load(source, chunkname, "t", env)
  if not chunk then return false, err end
  arm(seconds)
  local ok, run_err = pcall(chunk)
  disarm()
  if expired then return false, TIMEOUT_MESSAGE end
  if not ok then return false, tostring(run_err) end
  return true
end

function host.take_prints()
  local lines = take_prints()
  return t_concat(lines, "\0"), #lines
end

-- Trim spaces and tabs at both ends; most values need neither, so check bytes first.
local s_byte = string.byte
local function trim(value)
  local first = s_byte(value, 1)
  if first == 32 or first == 9 then
    local from = s_find(value, "[^ \t]")
    if not from then return "" end
    value = s_sub(value, from)
  end
  local last = s_byte(value, -1)
  if last == 32 or last == 9 then
    value = s_match(value, "^(.-)[ \t]*$")
  end
  return value
end

-- HeaderLines: the header's physical lines without line ends (the block passed in
-- ends with the blank line that ends the header, RFC 5322 §2.1).
local function header_lines(block)
  local lines, n, pos = {}, 0, 1
  while true do
    local e = s_find(block, "\n", pos, true)
    if not e then
      if pos <= #block then n = n + 1; lines[n] = s_sub(block, pos) end
      break
    end
    local stop = e - 1
    if s_byte(block, stop) == 13 then stop = stop - 1 end
    if stop < pos then break end
    n = n + 1
    lines[n] = s_sub(block, pos, stop)
    pos = e + 1
  end
  return lines
end

-- HeaderData: the unfolded value of each field's first occurrence (RFC 5322 §2.2.3),
-- looked up case-insensitively; pairs() shows each name as first written. A field name
-- is printable ASCII without ":" (§2.2), optionally followed by obsolete whitespace
-- before the colon (§4.5.3); a line starting with WSP continues the field.
--
-- Nothing is parsed until the script asks: a lookup is a plain (memcmp) search for
-- "\n<name>" in a lower-cased copy of the header, and only pairs() parses every field.
-- Scripts read one or two headers, and a full parse with Lua patterns would be most
-- of the cost of a call (docs/policy.md).
local s_gsub = string.gsub
local state = setmetatable({}, {__mode = "k"})  -- HeaderData -> its lookup state

local function field_end(text, colon)
  -- The unfolded value after the colon at `colon`: its line, plus continuation lines.
  local parts, n = {}, 0
  local from = colon + 1
  while true do
    local nl = s_find(text, "\n", from, true)
    local stop = (nl or #text + 1) - 1
    if s_byte(text, stop) == 13 then stop = stop - 1 end
    n = n + 1
    parts[n] = s_sub(text, from, stop)
    if not nl then break end
    local next_byte = s_byte(text, nl + 1)
    if next_byte ~= 32 and next_byte ~= 9 then break end
    from = nl + 1
  end
  return trim(n == 1 and parts[1] or t_concat(parts))
end

local function lookup(t, st, key)
  local found = st.lower_map[key]
  if found ~= nil then return found or nil end
  if s_find(key, "[^!-9;-~]") then return nil end  -- cannot be a field name
  local ltext = st.ltext
  if not ltext then
    ltext = s_lower(st.text)
    st.ltext = ltext
  end
  local needle = "\n" .. key
  local from = 1
  while true do
    local at = s_find(ltext, needle, from, true)
    if not at then
      st.lower_map[key] = false
      return nil
    end
    local _, colon = s_find(ltext, "^[ \t]*:", at + #needle)
    if colon then
      local value = field_end(st.text, colon)
      st.lower_map[key] = value
      rawset(t, s_sub(st.text, at + 1, at + #key), value)
      return value
    end
    from = at + 1
  end
end

local function fill(t, st)
  if st.filled then return end
  st.filled = true
  local unfolded = s_gsub(st.text, "\r?\n([ \t])", "%1")
  for name in s_gmatch(unfolded, "\n([!-9;-~]+)[ \t]*:") do
    lookup(t, st, s_lower(name))
  end
end

local header_mt = {
  __index = function(t, k)
    if type(k) ~= "string" then return nil end
    return lookup(t, state[t], s_lower(k))
  end,
  __pairs = function(t)
    fill(t, state[t])
    return next, t, nil
  end,
}

local function parse_header(block)
  local data = {}
  -- A leading "\n" makes the first field look like every other one.
  state[data] = {text = "\n" .. block, lower_map = {}}
  return setmetatable(data, header_mt), header_lines(block)
end

local function split_list(text)
  local out, n = {}, 0
  for item in s_gmatch(text, "[^\n]+") do
    n = n + 1
    out[n] = item
  end
  return out
end

local function primitive(v)
  local kind = type(v)
  if kind == "nil" or kind == "boolean" or kind == "number" or kind == "string" then
    return kind, v
  end
  return kind, nil
end

local function call(fname, seconds, ...)
  local fn = env[fname]
  if fn == nil then return "missing" end
  if type(fn) ~= "function" and not (type(fn) == "table" and getmetatable(fn)) then
    return "missing"
  end
  arm(seconds)
  local ok, result = pcall(fn, ...)
  disarm()
  if expired then return "timeout" end
  if not ok then return "error", tostring(result) end
  if result == nil then return "nil" end
  if type(result) ~= "table" then return "type", type(result) end
  return "ok", result
end

-- The VPOP3 field names, given by the daemon (mxsend/actions.py is their one source)
-- before the script loads: CheckFile's, ServerDetails', and the timeouts'.
local CHECKFILE_FIELDS, SERVER_FIELDS, TIMEOUT_FIELDS = {}, {}, {}

local function split_names(joined)
  local out = {}
  for name in s_gmatch(joined, "[^,]+") do out[#out + 1] = name end
  return out
end

function host.set_fields(checkfile, server, timeouts)
  CHECKFILE_FIELDS = split_names(checkfile)
  SERVER_FIELDS = split_names(server)
  TIMEOUT_FIELDS = split_names(timeouts)
end

-- CheckFile: the Actions in arrive as values in the order of CHECKFILE_FIELDS; the
-- result leaves as the number of pending print lines, the status, then (type, value)
-- for each field of CHECKFILE_FIELDS.
function host.check_file(seconds, filename, size, ctime, retries, lasttry, return_path,
                         recipients, header_block, ...)
  local data, lines = parse_header(header_block)
  local values = {...}
  local actions = {}
  for i = 1, #CHECKFILE_FIELDS do actions[CHECKFILE_FIELDS[i]] = values[i] end
  local status, result = call("CheckFile", seconds, filename, actions, size, ctime,
    retries, lasttry, return_path, split_list(recipients), data, lines)
  if status ~= "ok" then return nprints, status, result end
  local out, n = {}, 0
  for i = 1, #CHECKFILE_FIELDS do
    local kind, v = primitive(result[CHECKFILE_FIELDS[i]])
    out[n + 1], out[n + 2] = kind, v
    n = n + 2
  end
  return nprints, "ok", nil, table.unpack(out, 1, n)
end

-- ServerDetails: the Actions in arrive as two flat lists of values in the order of
-- SERVER_FIELDS then TIMEOUT_FIELDS; the result leaves as one flat list of
-- (type, value) pairs in the same order ("timeouts" itself not a table: all "nil").
function host.server_details(seconds, authsender, originator, server, domain, length,
                             connid, connection, tlspolicy, header_lines, ...)
  local params = {
    authsender = authsender, originator = originator, server = server, domain = domain,
    length = length, connnid = connid, connid = connid, connection = connection,
    tlspolicy = tlspolicy,
  }
  local values = {...}
  local actions, timeouts = {}, {}
  local nserver = #SERVER_FIELDS
  for i = 1, nserver do actions[SERVER_FIELDS[i]] = values[i] end
  for i = 1, #TIMEOUT_FIELDS do timeouts[TIMEOUT_FIELDS[i]] = values[nserver + i] end
  actions.timeouts = timeouts
  local lines = {}
  for line in s_gmatch(header_lines, "([^\r\n]+)") do lines[#lines + 1] = line end
  local status, result = call("ServerDetails", seconds, params, lines, actions)
  if status ~= "ok" then return nprints, status, result end
  local out, n = {}, 0
  for i = 1, nserver do
    local kind, v = primitive(result[SERVER_FIELDS[i]])
    out[n + 1], out[n + 2] = kind, v
    n = n + 2
  end
  local t = result.timeouts
  local tkind = type(t)
  for i = 1, #TIMEOUT_FIELDS do
    local kind, v = "nil", nil
    if tkind == "table" then kind, v = primitive(t[TIMEOUT_FIELDS[i]]) end
    out[n + 1], out[n + 2] = kind, v
    n = n + 2
  end
  return nprints, "ok", tkind, table.unpack(out, 1, n)
end

-- The VPOP3 8.8 hooks (contract §9) answer with plain values, not an Actions table:
-- each of the first two results leaves as (type, value); a table leaves as the
-- strings and numbers of its array part joined by "\n" (a list of servers).
local function flat(v)
  local kind = type(v)
  if kind ~= "table" then return primitive(v) end
  local parts, n = {}, 0
  for i = 1, #v do
    local item = v[i]
    local ik = type(item)
    if ik == "string" or ik == "number" then n = n + 1; parts[n] = tostring(item) end
  end
  return "table", t_concat(parts, "\n")
end

local function call_values(fname, seconds, ...)
  local fn = env[fname]
  if type(fn) ~= "function" and not (type(fn) == "table" and getmetatable(fn)) then
    return nprints, "missing"
  end
  arm(seconds)
  local ok, first, second = pcall(fn, ...)
  disarm()
  if expired then return nprints, "timeout" end
  if not ok then return nprints, "error", tostring(first) end
  local k1, v1 = flat(first)
  local k2, v2 = flat(second)
  return nprints, "ok", k1, v1, k2, v2
end

-- ReturnCodeHandler(LastCommand, FullResponse, LastLine)
function host.return_code(seconds, command, full, last)
  return call_values("ReturnCodeHandler", seconds, command, full, last)
end

-- ModifyReturnPath(ComputedMailFrom, MailFrom, OriginalMailFrom, AuthSender, Recipients,
--                  CreationTime, Headers, Size, SenderIPAddress, Subject, AllRecipients)
function host.modify_return_path(seconds, computed, mail_from, original, auth, recipients,
                                 ctime, header_block, size, sender_ip, subject, all)
  local _, lines = parse_header(header_block)
  return call_values("ModifyReturnPath", seconds, computed, mail_from, original, auth,
    split_list(recipients), ctime, lines, size, sender_ip, subject, split_list(all))
end

-- mxserverrules.lua: GetCheckCache / GetOverrides (Domain, Retries, Size) and
-- CheckServer(Domain, MXServer, Retries, Size, DefaultResult).
function host.server_rule(seconds, fname, domain, retries, size, server, default)
  if fname == "CheckServer" then
    return call_values(fname, seconds, domain, server, retries, size, default)
  end
  return call_values(fname, seconds, domain, retries, size)
end

return host
