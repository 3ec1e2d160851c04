"""The commands of `sluice`, one module per command group.

Each command parses its options, calls the library module that does the work (ops/dlq.py,
ops/backfill.py, producers/produce.py, …) and prints the result; `common` holds what they
share (exit codes, options, output), `failures` turns errors into one-line messages and
`progress` reports long work. ops/cli.py assembles them into the `sluice` command.
"""
