"""The flow collector: a gRPC service (service) over a SQLite store (store), run by server; the `collector` and
`flows` commands (cli, with units for durations and sizes); addresses, TLS and tokens shared with clients (channel)."""
