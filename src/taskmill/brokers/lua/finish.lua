-- ARGV: prefix, result_ttl, n, then 5 fields per finish: id, token, kind, a, b
-- kinds: S result | R delay_s error | F error | C reason | L (released: back to queued, the
-- attempt refunded). Returns '1'/'0' per finish as one string: '0' = stale token, not applied.
local now = now_s()
return apply_finishes(2, now)
