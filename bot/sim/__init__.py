"""What if? Replay arrivals through a policy and a model of how fast experts answer.

Layering: everything in this package imports only `bot.core` and `storage` (the flow may use it
for forecasts), except `bot.sim.cli`, the command line, which also reads the digest figures from
`bot.reports` so that actual and simulated weeks are measured by the same functions.
"""
