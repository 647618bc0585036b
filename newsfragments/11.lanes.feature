Lanes: `[[lane]]` tables (defaults `transactional` and `bulk`) with priority, a reserved share
of each destination's connections, deadline, retry schedule and DSN policy; chosen per API
token, trusted `X-Txmta-Lane` header, API `MessageStream`, SMTP user or listener. Fresh mail of
higher lanes is tried first, each priority level has its own in-flight budget, and the lane is
in the pool key. `txmta queue list --lane`. Spool format 4 (due index by class), migrated at
open.
