"""The harness, in three rooms that follow the flow of a run, with the CLI (cli.py) on top:

- running/: what to run and keeping what ran. Suites (TOML in bench/suites/) expand into cells; the schedule
  orders them (a profile series stops at its first budget failure); an executor (this process, or Ray) runs
  each cell's measurement and yields its rows; the runner alone settles them into the store (results.csv, written
  once per cell, resumable), with the environment recorded beside it.
- measuring/: one measurement each: training and evaluation on a task, time / memory / FLOP profiles, the
  fresh-process memory probe, streaming, memory dynamics, and the hybrid-against-parts timing script.
- analysing/: reading results back: scaling fits with their intervals, accuracy and forecasting tables, the
  claims ledger, the report, the plots, and the comparison of two runs.

Dependencies point one way: cli -> running -> measuring; analysing reads only the store's schema and reader
from running; nothing in measuring imports running or analysing (tests/test_architecture.py)."""
