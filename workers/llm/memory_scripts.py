"""The Lua scripts behind ``workers.llm.memory``: each change to a user's history is
one atomic step in Redis (records are JSON, so the scripts can read them with cjson)."""

from __future__ import annotations

# Appends one message, trims to the cap, refreshes both TTLs, atomically.
# KEYS: messages, summary, stored marker, heard override. ARGV: the encoded record,
# the cap, ttl seconds, '1' when the record belongs to a turn (then it is stored at
# most once per turn and role, and an assistant reply is replaced by what the user
# is already known to have heard). Returns the stored record, or false (duplicate).
APPEND = """
local ttl = tonumber(ARGV[3])
local record = ARGV[1]
if ARGV[4] == '1' then
  if not redis.call('SET', KEYS[3], '1', 'NX', 'EX', ttl) then return false end
  local heard = redis.call('GET', KEYS[4])
  if heard then
    local m = cjson.decode(record)
    if m.role == 'assistant' then
      m.content = heard
      m.interrupted = true
      record = cjson.encode(m)
    end
  end
end
redis.call('RPUSH', KEYS[1], record)
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
return record
"""

# Replaces a turn's stored reply with what the user heard; remembers it for a reply
# not stored yet. KEYS: messages, heard override. ARGV: turn id, heard text, ttl.
# Returns 1 when a stored reply was changed, 0 when it is kept for later.
HEARD = """
redis.call('SET', KEYS[2], ARGV[2], 'EX', tonumber(ARGV[3]))
local items = redis.call('LRANGE', KEYS[1], 0, -1)
for i = #items, 1, -1 do
  local ok, m = pcall(cjson.decode, items[i])
  if ok and type(m) == 'table' and m.turn_id == ARGV[1] and m.role == 'assistant' then
    m.content = ARGV[2]
    m.interrupted = true
    redis.call('LSET', KEYS[1], i - 1, cjson.encode(m))
    return 1
  end
end
return 0
"""

# A continued turn replaces the turn it continues: that turn's messages (the fragment
# of the user's words, any reply) are removed and marked stored, so that a late append
# for it stores nothing; then the new turn's user message is appended once.
# KEYS: messages, summary, the old turn's user and assistant markers, the new turn's
# user marker. ARGV: the encoded record, the cap, ttl seconds, the old turn id.
# Returns the stored record, or false (the new turn's message was stored already).
CONTINUE = """
local ttl = tonumber(ARGV[3])
redis.call('SET', KEYS[3], '1', 'EX', ttl)
redis.call('SET', KEYS[4], '1', 'EX', ttl)
if not redis.call('SET', KEYS[5], '1', 'NX', 'EX', ttl) then return false end
local items = redis.call('LRANGE', KEYS[1], 0, -1)
local dropped = 0
for i = #items, 1, -1 do
  local ok, m = pcall(cjson.decode, items[i])
  if ok and type(m) == 'table' and m.turn_id == ARGV[4] then
    redis.call('LSET', KEYS[1], i - 1, '__continued__')
    dropped = dropped + 1
  end
end
if dropped > 0 then redis.call('LREM', KEYS[1], 0, '__continued__') end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
return ARGV[1]
"""

# Removes the summarised head of the list and stores the new summary, atomically.
# KEYS: messages, summary. ARGV: summary text ('' = do not store one), the id of
# the last summarised message, how many messages were summarised, ttl seconds.
# The last summarised record is looked for among the first `covered` entries (the
# cap may have trimmed some of the head meanwhile: those are in the summary too).
# Records are matched by id, not bytes: `record_heard` may have re-encoded one.
# Not found: the list changed under us (expired, already replaced): nothing is done.
REPLACE = """
local n = tonumber(ARGV[3])
local head = redis.call('LRANGE', KEYS[1], 0, n - 1)
local found = -1
for i = #head, 1, -1 do
  local ok, m = pcall(cjson.decode, head[i])
  if ok and type(m) == 'table' and m.id == ARGV[2] then found = i break end
end
if found < 0 then return -1 end
redis.call('LTRIM', KEYS[1], found, -1)
if ARGV[1] ~= '' then
  redis.call('SET', KEYS[2], ARGV[1], 'EX', tonumber(ARGV[4]))
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[4]))
return found
"""
