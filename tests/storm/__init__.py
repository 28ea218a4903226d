"""The storm harness: real `replyclock web` and `replyclock run` processes on one PostgreSQL.

A load generator posts signed webhook deliveries at a fixed concurrency to one `web` process;
several `run` processes share the work (cards, acknowledgements, the ladder) against the Slack
stand-in (`bot.demo.standin`) and a loopback endpoint that receives the acknowledgements
(`reply_url`); afterwards the database, the stand-in's call log, the reply endpoint's log and
the processes' own JSON log lines are checked against each other. Used by tests/test_storm.py
(about 1,500 posts) and bench/storm.py (10,000 posts, with the lateness report).

Modules: `scenario` (the policy and the schedule of deliveries), `servers` (the reply
endpoint), `cluster` (the processes), `loader` (the load generator), `analysis` (checks and
figures), `storm` (all of it in order).
"""
