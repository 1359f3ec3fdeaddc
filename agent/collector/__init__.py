"""The flow collector: a gRPC service (service, server) over a SQLite store (store), and its commands (cli)."""
