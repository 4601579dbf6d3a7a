"""The Redis scripts that change a run: each runs atomically, checks the run's state (and the
shard's lease or result) and then writes, so that the run's state machine (``nasq.runstate``)
holds however workers, clients and healing race. ``RunStore`` (``store.py``) calls them; the
state sets they check come from ``nasq.runstate`` as arguments, and the names they answer with
(``runstate.Outcome``), the shard statuses they read (``ShardStatus``, ``$S_*``) and the ways a
shard is sent again (``Redispatch``, ``$R_*``) are put into their text from there when this
module is loaded (``$O_*`` below): no script spells one.

Conventions: the run's state record is JSON with a ``state`` field; sets of states are passed
as comma-separated lists. The scripts a shard runs (claim, tick, commit: once a shard, or once
a second) write no expiry: a run's records are given ``result_expires`` by its first kept
result, by healing while the run goes (``ShardLedger.keep_run``) and by every transition; the
rarer scripts give it to what they write.
"""

from string import Template

from ..runstate import Outcome, Redispatch, ShardStatus

_COMMON = """
local function state_of(key)
  local raw = redis.call('GET', key)
  if not raw then return nil end
  return cjson.decode(raw)['state']
end
local function among(value, list)
  if not value then return false end
  for item in string.gmatch(list, '[^,]+') do
    if item == value then return true end
  end
  return false
end
local function keep(key, ttl)
  redis.call('EXPIRE', key, ttl)
end
-- a copy of a shard whose result is not kept: counted in the run's dropped hash
local function drop(key, shard, ttl, why)
  redis.call('HINCRBY', key, shard, 1)
  keep(key, ttl)
  return {$O_DROPPED, why}
end
-- a lease's value is its holder, or "holder|images done" once the holder reported progress
local function holder_of(value)
  if not value then return nil end
  return string.match(value, '^(.*)|%d+$$') or value
end
"""

#: The value a shard's lease key takes once its result is kept (for ``result_expires``): a
#: late copy's claim is skipped and a running copy's tick stops ("done-elsewhere") without
#: reading the results. No holder is spelled so (``holder_of`` keeps it whole).
KEPT = "|kept"

#: A worker starts a shard: 6 commands (the run's state and the lease in one read, and in one
#: more what the run holds against this worker: excluded, or this shard failed on it before).
#: KEYS: state attempts running lease barred. ARGV: shard holder lease_ms running_json
#: max_attempts may_start kept worker.
#: -> {"ok", attempt, failures in a row} | {"ended", state} | {"gone"} | {"has-result"}
#:    | {"exhausted", attempt} | {"refused", "excluded" | "failed-here"}
CLAIM = _COMMON + """
local got = redis.call('MGET', KEYS[1], KEYS[4])
if not got[1] then return {$O_GONE} end
local st = cjson.decode(got[1])['state']
if not among(st, ARGV[6]) then return {$O_ENDED, st} end
if got[2] == ARGV[7] then return {$O_HAS_RESULT} end
local bar = redis.call('HMGET', KEYS[5], ARGV[8], ARGV[8] .. '|' .. ARGV[1], ARGV[8] .. '#streak')
if bar[1] then return {$O_REFUSED, $O_EXCLUDED} end
if bar[2] then return {$O_REFUSED, $O_FAILED_HERE} end
local n = redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
redis.call('SET', KEYS[4], ARGV[2], 'PX', ARGV[3])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
if n > tonumber(ARGV[5]) then return {$O_EXHAUSTED, n} end  -- the caller holds the lease to record the failure
return {$O_OK, n, tonumber(bar[3] or '0')}
"""

#: A running shard's progress (at most about once a second), written into its lease, which it
#: extends: 3 commands. KEYS: state lease. ARGV: holder done lease_ms may_go_on kept.
#: -> {"ok"} | {"stop", why}: why is the run's state, "superseded" (another worker holds the
#: lease: the shard was dispatched again) or "done-elsewhere" (another copy's result was kept).
TICK = _COMMON + """
local got = redis.call('MGET', KEYS[1], KEYS[2])
if not got[1] then return {$O_STOP, $O_GONE} end
local st = cjson.decode(got[1])['state']
if not among(st, ARGV[4]) then return {$O_STOP, st} end
if got[2] == ARGV[5] then return {$O_STOP, $O_DONE_ELSEWHERE} end
local holder = holder_of(got[2])
if holder and holder ~= ARGV[1] then return {$O_STOP, $O_SUPERSEDED} end
redis.call('SET', KEYS[2], ARGV[1] .. '|' .. ARGV[2], 'PX', ARGV[3])
return {$O_OK}
"""

#: A shard's copy ends. KEYS: state results finished running dropped lease attempts barred.
#: ARGV: shard holder status result_json summary_json expires accepts uncounted ended kept
#: worker reset. status "ok" (result_json: the full result) or "stopped" (the copy gave up:
#: superseded, or its run ended); a failure goes through ``FAIL``. The first ok result of a
#: shard is kept (7 commands; one more when ``reset`` says that the worker's run of failures
#: ends, and one more to count the finished shards when the run's results are not all in); a
#: later copy, or any copy once the run is done or cancelled, is dropped and counted. The run's
#: first kept result gives the run's shard records their expiry; healing gives it again while
#: the run goes, and the run's end does too (no expiry per write).
#: -> {"accepted", results kept, shards of the run, shards finished (ok or failed for good)}
#:    | {"dropped", why}
COMMIT = _COMMON + """
local got = redis.call('MGET', KEYS[1], KEYS[6])
local mine = holder_of(got[2]) == ARGV[2]
local record = got[1] and cjson.decode(got[1])
local st = record and record['state']
local function dropped(why) return drop(KEYS[5], ARGV[1], ARGV[6], why) end
if ARGV[3] ~= $S_OK and mine then redis.call('DEL', KEYS[6]) end
if ARGV[3] == $S_STOPPED then
  if st == nil or among(st, ARGV[8]) then return {$O_DROPPED, st or $O_GONE} end
  return dropped(among(st, ARGV[9]) and $O_LATE or $O_SUPERSEDED)
end
if not among(st, ARGV[7]) then
  if mine then redis.call('DEL', KEYS[6]) end
  return dropped($O_LATE)
end
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[4]) == 0 then
  if mine then redis.call('SET', KEYS[6], ARGV[10], 'EX', ARGV[6]) end
  return dropped($O_DUPLICATE)
end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[5])
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('SET', KEYS[6], ARGV[10], 'EX', ARGV[6])
if ARGV[12] == '1' then redis.call('HDEL', KEYS[8], ARGV[11] .. '#streak') end
local kept = redis.call('HLEN', KEYS[2])
if kept == 1 then
  for _, i in ipairs({2, 3, 4, 7}) do keep(KEYS[i], ARGV[6]) end
end
return {$O_ACCEPTED, kept, record['shards'] or 0, kept < (record['shards'] or 0) and redis.call('HLEN', KEYS[3]) or kept}
"""

#: A copy of a shard failed on a worker (or a worker cannot take it and no other may): the
#: failure is added to the shard's list, the worker's run of failures counted (and, when the
#: caller decided so, the worker excluded from the run), and the shard either fails for good
#: (``final``: its record in ``finished``) or is taken for dispatching again elsewhere (counted
#: as ``REDISPATCH`` counts). The caller decided from what it read: the script writes only if
#: the shard's failure list is still what it read (compare and set), and the run accepts
#: results, and the shard has none, and no other copy holds it.
#: A copy that started (it held the lease) and failed is not a death of its worker: its start is
#: taken off the attempts (``max_attempts`` counts starts that never ended).
#: KEYS: state results finished running lease failures barred excluded redispatched
#:       redispatched_at redispatched_why dropped attempts.
#: ARGV: shard holder worker seen_failures failures_json streak exclusion_json final
#:       summary_json accepts now why expires.
#: -> {"failed", finished, shards, running} | {"retry", dispatches} | {"changed"}
#:    | {"dropped", why}
FAIL = _COMMON + """
local got = redis.call('MGET', KEYS[1], KEYS[5])
local mine = ARGV[2] ~= '' and holder_of(got[2]) == ARGV[2]
local record = got[1] and cjson.decode(got[1])
local st = record and record['state']
local function dropped(why) return drop(KEYS[12], ARGV[1], ARGV[13], why) end
if not among(st, ARGV[10]) then
  if mine then redis.call('DEL', KEYS[5]) end
  return dropped($O_LATE)
end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return dropped($O_DUPLICATE) end
if ARGV[2] ~= '' and not mine and redis.call('HEXISTS', KEYS[4], ARGV[1]) == 1 then return dropped($O_SUPERSEDED) end
if (redis.call('HGET', KEYS[6], ARGV[1]) or '') ~= ARGV[4] then return {$O_CHANGED} end
if mine then
  redis.call('DEL', KEYS[5])
  redis.call('HINCRBY', KEYS[13], ARGV[1], -1)
end
redis.call('HSET', KEYS[6], ARGV[1], ARGV[5])
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[7], ARGV[3] .. '|' .. ARGV[1], 1, ARGV[3] .. '#streak', ARGV[6])
end
if ARGV[7] ~= '' then
  redis.call('HSET', KEYS[7], ARGV[3], 1)
  redis.call('HSET', KEYS[8], ARGV[3], ARGV[7])
end
redis.call('HDEL', KEYS[4], ARGV[1])
for _, i in ipairs({6, 7, 8}) do keep(KEYS[i], ARGV[13]) end
if ARGV[8] == '1' then
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[9])
  keep(KEYS[3], ARGV[13])
  return {$O_FAILED, redis.call('HLEN', KEYS[3]), record['shards'] or 0, redis.call('HLEN', KEYS[4])}
end
local n = redis.call('HINCRBY', KEYS[9], ARGV[1], 1)
redis.call('HSET', KEYS[10], ARGV[1], ARGV[11])
redis.call('HSET', KEYS[11], ARGV[1], ARGV[12])
for _, i in ipairs({9, 10, 11}) do keep(KEYS[i], ARGV[13]) end
return {$O_RETRY, n}
"""

#: The run moves to another state if it is in one the transition starts from; a cancel also
#: clears the running shards (they stop on their next progress) and a resume forgets the
#: attempts, progress and failures of the shards it sends again, lifts the run's exclusions
#: (the bars on workers, not the record of them) and records its merge's task id. Every shard
#: record of the run is given the run's expiry again (shard scripts do not); a run that starts
#: again (resume) forgets that its earlier report's files were published and rendered.
#: KEYS (``RunStore.transition`` names them): state active report predictions published
#: rendered rendering running attempts finished failures barred merges, then the other shard
#: records (given the expiry only).
#: ARGV: from state_json new_state run_id expires report_json predictions_json clear_running
#:       merge_id ended lift shard...
#: -> {"ok"} | {"state", current state} | {"gone"}
TRANSITION = _COMMON + """
local st = state_of(KEYS[1])
if not st then return {$O_GONE} end
if not among(st, ARGV[1]) then return {$O_STATE, st} end
if ARGV[6] ~= '' then redis.call('SET', KEYS[3], ARGV[6], 'EX', ARGV[5]) end
if ARGV[7] ~= '' then redis.call('SET', KEYS[4], ARGV[7], 'EX', ARGV[5]) end
if ARGV[8] == '1' then redis.call('DEL', KEYS[8]) end
for i = 12, #ARGV do
  redis.call('HDEL', KEYS[9], ARGV[i])
  redis.call('HDEL', KEYS[10], ARGV[i])
  redis.call('HDEL', KEYS[11], ARGV[i])
end
if ARGV[11] == '1' then redis.call('DEL', KEYS[12]) end
if ARGV[9] ~= '' then redis.call('SADD', KEYS[13], ARGV[9]) end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[5])
for i = 8, #KEYS do keep(KEYS[i], ARGV[5]) end
if among(ARGV[3], ARGV[10]) then
  redis.call('SREM', KEYS[2], ARGV[4])
else
  redis.call('SADD', KEYS[2], ARGV[4])
end
redis.call('DEL', KEYS[5], KEYS[6], KEYS[7])  -- the report the caller now writes is not published yet
return {$O_OK}
"""

#: A shard is taken for dispatching again, by one caller only, and counted in the same step (a
#: broker that dies between the two can leave neither a claim without its count nor the reverse).
#: "lost": the shard was running and its lease expired: the caller that removes it from the
#: running list takes it, and the lost copy is added to the shard's failures (its worker went
#: away: not barred from the shard, since a machine that restarts under the same name may be the
#: only one there is). "stranded": its message is nowhere; the caller that saw the shard's
#: dispatch count at ARGV[5] takes it (compare and set), and its count of missing messages goes
#: up; "resume": likewise, without that count. "revoked": always (a failed run's in-flight
#: shards, sent again by the one failing it). ARGV[6]: why, as ``nasq status`` says it.
#: KEYS: running redispatched redispatched_at redispatched_why failures missing.
#: ARGV: shard how now expires seen why.
#: -> the shard's dispatch count now (taken) | 0
REDISPATCH = _COMMON + """
local lost = nil
if ARGV[2] == $R_LOST then
  lost = redis.call('HGET', KEYS[1], ARGV[1])
  if not lost then return 0 end
end
if (ARGV[2] == $R_STRANDED or ARGV[2] == $R_RESUME)
    and tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0') ~= tonumber(ARGV[5]) then
  return 0
end
-- the writes that need memory first: on a full broker the script stops before changing anything
local n = redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[4], ARGV[1], ARGV[6])
if ARGV[2] == $R_STRANDED then
  redis.call('HINCRBY', KEYS[6], ARGV[1], 1)
  keep(KEYS[6], ARGV[4])
end
if lost then
  local info = cjson.decode(lost)
  local list = cjson.decode(redis.call('HGET', KEYS[5], ARGV[1]) or '[]')
  list[#list + 1] = {worker = info['worker'], host = info['host'], device = info['device'], kind = $R_LOST,
                     error = 'its worker went away (the lease expired)', at = tonumber(ARGV[3])}
  redis.call('HSET', KEYS[5], ARGV[1], cjson.encode(list))
  keep(KEYS[5], ARGV[4])
end
for i = 2, 4 do keep(KEYS[i], ARGV[4]) end
redis.call('HDEL', KEYS[1], ARGV[1])
return n
"""

#: A lease is extended only by the worker that holds it. KEYS: lease. ARGV: holder lease_ms.
RENEW = _COMMON + """
if holder_of(redis.call('GET', KEYS[1])) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


#: A claim (a worker that publishes or renders a run's files): "nx" takes it if free (or held
#: by ARGV[4], a holder found gone), "renew" also keeps it if this holder has it, "take" takes it
#: whatever holds it. KEYS: claim. ARGV: holder px mode gone_holder. -> 1 | 0
CLAIM_KEY = """
local cur = redis.call('GET', KEYS[1])
if ARGV[3] == 'take' or not cur or (ARGV[4] ~= '' and cur == ARGV[4]) or (ARGV[3] == 'renew' and cur == ARGV[1])
    or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

#: Drop a claim if this holder has it. KEYS: claim. ARGV: holder. -> 1 | 0
UNCLAIM_KEY = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _named(text: str) -> str:
    """A script's text with the names of ``nasq.runstate`` put in, quoted for Lua."""
    names = {f"{prefix}_{m.name}": f"'{m.value}'" for prefix, kind in (("O", Outcome), ("S", ShardStatus),
                                                                         ("R", Redispatch)) for m in kind}
    return Template(text).substitute(names)


CLAIM, TICK, COMMIT, FAIL, TRANSITION, REDISPATCH, RENEW = map(_named, (CLAIM, TICK, COMMIT, FAIL, TRANSITION,
                                                                       REDISPATCH, RENEW))
