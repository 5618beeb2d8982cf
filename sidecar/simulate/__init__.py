"""`qos-sidecar simulate`: replay recorded traffic through the real decision core, under a
current and a proposed policy, in virtual time (see docs/simulate.md).

- `traffic`: recorded traffic (benchmark records, Envoy's JSON access log, an Azure trace)
  to `Arrival`s.
- `quota`: the store's quota arithmetic (GCRA buckets, concurrency leases) at a virtual
  clock.
- `backend`: a model server that drains at a fixed rate: the load signals `judge` reads.
- `replay`: the event loop that drives `core.admission` step by step, as the service does.
- `report`: per tenant and class tallies, the difference, `--fail-if` guards, output.
- `command`: the CLI subcommand's wiring.

Nothing here does network or event-loop I/O; files are read in `traffic` and `command` only.
"""
