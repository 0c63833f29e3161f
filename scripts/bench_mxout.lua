-- mxout.lua for scripts/bench: a realistic policy, so the benchmark pays for the Lua
-- calls a production script makes (a header lookup, a priority, a per-server tweak).
-- VPOP3-compatible: both functions take Actions, change it and return it.

function CheckFile(Filename, Actions, Size, CreationTime, Retries, LastTryTime,
                   ReturnPath, Recipients, HeaderData, HeaderLines)
  -- Bulk mail goes after everything else; large messages slightly later.
  local precedence = HeaderData["Precedence"]
  if precedence ~= nil and string.lower(precedence) == "bulk" then
    Actions.Priority = 30
  elseif Size > 3500 then
    Actions.Priority = 45
  else
    Actions.Priority = 60
  end
  -- Give up on old mail after ten attempts instead of waiting for queue.max_age.
  if Retries >= 10 then
    Actions.ForceLastTry = true
  end
  -- Never send to a domain we know is a trap (none in the benchmark's workload).
  for i = 1, #Recipients do
    if string.find(Recipients[i], "@spamtrap%.test$") then
      Actions.SkipSend = true
      Actions.Reason = "recipient is a spam trap"
    end
  end
  return Actions
end

function ServerDetails(Parameters, HeaderLines, Actions)
  -- The loopback sink offers no TLS: don't ask (a production script would pin or
  -- require TLS for known partners here instead).
  if Parameters.server == "mx.sink.test" then
    Actions.tryTLS = 0
  end
  Actions.HELOname = "bench.localdomain"
  -- Longer data timeout for big messages.
  if Parameters.length > 1000000 then
    Actions.timeouts.dataend = 900
  end
  return Actions
end
