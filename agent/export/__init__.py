"""Exporters: flow records to the collector (collector_client), records as plain data (records)."""
