-- mxout.lua: mxsend's delivery policy, compatible with VPOP3's script of the same name.
--
-- mxsend calls two functions (both optional; without them the defaults apply):
--   CheckFile     each time a message is about to be attempted: send now? how urgently?
--   ServerDetails before sending a message to one server: how to talk to it.
-- Both get an Actions table with the defaults filled in and must return it. A script
-- error never costs mail: mxsend logs `script_error` and uses the defaults.
--
-- Try it without sending anything:
--   mxsend check-script config/mxout.lua --message spool/new/SOMEFILE --server mx.example.com
--
-- The file is reloaded when it changes (and on SIGHUP); a version that does not compile
-- is logged and the previous one stays in use. Lua 5.2, sandboxed: string, table, math,
-- bit32, os.time/date/clock/difftime/getenv, read-only io.open, print (to the log) and
-- ParseURL(url).

-- Domains whose servers are known to be slow: give them more time (seconds).
local SLOW_DOMAINS = { ["slow.example.net"] = true }

-- Partners that must only ever be reached over verified TLS, with the name their
-- certificate carries (wildcards * and ? allowed).
local TLS_PARTNERS = {
  ["bank.example"] = "*.bank.example",
}

-- CheckFile(Filename, Actions, Size, CreationTime, Retries, LastTryTime, ReturnPath,
--           Recipients, HeaderData, HeaderLines)
--   Filename      path of the spool file
--   Size          bytes of the message
--   CreationTime  "YYYYMMDDHHMMSS" (local time) when it was queued
--   Retries       attempts so far (0 the first time)
--   LastTryTime   "YYYYMMDDHHMMSS" of the last attempt, "" before the first
--   ReturnPath    envelope sender, "" for a bounce
--   Recipients    list of the recipients still pending
--   HeaderData    header name -> value (first occurrence, unfolded, any case works)
--   HeaderLines   the raw header lines
-- Actions: SkipSend=false, ForceLastTry=false, Priority=50 (1..100, 100 first), Reason=""
function CheckFile(Filename, Actions, Size, CreationTime, Retries, LastTryTime,
                   ReturnPath, Recipients, HeaderData, HeaderLines)
  -- Bulk mail waits behind person-to-person mail.
  local precedence = HeaderData["Precedence"]
  if precedence == "bulk" or precedence == "list" or HeaderData["List-Id"] then
    Actions.Priority = 20
  end

  -- Bounces (empty return path) and urgent mail go first.
  if ReturnPath == "" or HeaderData["X-Priority"] == "1" then
    Actions.Priority = 90
  end

  -- Large newsletters are held during office hours and sent in the evening.
  local hour = tonumber(os.date("%H"))
  if Size > 5 * 1024 * 1024 and precedence == "bulk" and hour >= 8 and hour < 18 then
    Actions.SkipSend = true
    Actions.Reason = "large bulk message held until 18:00"
  end

  -- A message that has already failed ten times with a huge recipient list is
  -- probably not going to make it: make this the last attempt (then it bounces).
  if Retries >= 10 and #Recipients > 500 then
    Actions.ForceLastTry = true
  end

  return Actions
end

-- ServerDetails(Parameters, HeaderLines, Actions)
--   Parameters: authsender, originator, server, domain, length, connid (also connnid,
--               VPOP3's spelling), connection
-- Actions: tryESMTP=1, tryTLS=1, HELOname=<smtp.helo_name>, useBATV=0, allowDSN=1,
--   forceTLS=0, verifyCert=0, checkCertName="", checkCertThumbprint="",
--   returnAddressModifier=0, defaultReturnAddress="", nullReturnAddress="",
--   timeouts={connect=60, greeting=300, ehlo=300, starttls=120, mail=300, rcpt=300,
--             data=120, datablock=180, dataend=600}
-- Flags: 0, "0", false, "false" and "no" are off; other numbers and true are on.
function ServerDetails(Parameters, HeaderLines, Actions)
  local server = Parameters["server"]
  local domain = Parameters["domain"]

  -- VPOP3's documented example: don't use TLS when connecting to 'mail.broken.com'.
  if server == "mail.broken.com" then
    Actions["tryTLS"] = 0
  end

  -- A very old server that chokes on EHLO: speak plain HELO (no ESMTP, so no DSN).
  if server == "mx.ancient.example.org" then
    Actions.tryESMTP = 0
  end

  -- Partners: TLS is required, the chain must verify and the name must match.
  local cert_name = TLS_PARTNERS[domain]
  if cert_name then
    Actions.forceTLS = 1
    Actions.verifyCert = 1
    Actions.checkCertName = cert_name
  end

  -- One partner pins its certificate instead (SHA-256 of the DER certificate).
  if server == "mx.pinned.example" then
    Actions.checkCertThumbprint =
      "3F:1A:0C:5E:9B:22:7D:44:81:6A:90:12:CC:4B:7E:3D:55:60:AB:19:0E:F2:47:8C:31:D6:5B:A0:29:7E:18:C4"
  end

  -- Sign the return path with BATV for this partner, which checks bounces against it
  -- (needs batv.key_file in mxsend.toml).
  if domain == "batv-partner.example" then
    Actions.useBATV = 1
  end

  -- Do not pass DSN requests to this relay, which mishandles them.
  if domain == "legacy.example" then
    Actions.allowDSN = 0
  end

  -- Mail sent on behalf of customers (authenticated senders) goes out with our own
  -- return address; auto-replies and notifications go out with the null path.
  if Parameters["authsender"] ~= "" and Parameters["authsender"] ~= Parameters["originator"] then
    Actions.returnAddressModifier = 1
    Actions.defaultReturnAddress = "bounces@example.com"
  end
  for _, line in ipairs(HeaderLines) do
    if string.find(string.lower(line), "^auto%-submitted:%s*auto%-replied") then
      Actions.returnAddressModifier = 2
      Actions.nullReturnAddress = ""
    end
  end

  -- Present ourselves under the name this partner's allow-list expects.
  if domain == "strict.example" then
    Actions.HELOname = "outbound.example.com"
  end

  -- Slow servers get longer timeouts (RFC 5321 §4.5.3.2 gives the usual values).
  if SLOW_DOMAINS[domain] then
    Actions.timeouts.connect = 120
    Actions.timeouts.dataend = 1200
  end

  return Actions
end
