Per-provider traffic shaping: `[[shaping]]` rules (MX suffixes; connections, messages per
connection, rate, recipients per message) and `[delivery] shaping` for a file of them (sample
`etc/shaping.toml`); replies that mean "slow down" (`Verdict.slow_down`) back the provider off:
half its connections and rate, no new connections for a cool-down that doubles while they
repeat, then recovery step by step. `txmta status` providers, metrics
`txmta_shaping_backoffs_total` and `txmta_shaping_factor`.
