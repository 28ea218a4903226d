"""What if? Replay arrivals through a policy and a model of how fast experts answer.

Layering: this package imports only `bot.core`, `bot.config` (the policy validator) and
`storage`, so the flow may use it (forecasts for acknowledgements and "at risk" notices). The
parts that measure with the digest live in `bot.reports`: `simulation` (figures of simulated
weeks), `backtest` and `simulate_command` (`replyclock simulate`).
"""
