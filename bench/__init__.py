"""Benchmark suite for Pusher-protocol servers (fastrelay, soketi, floors)."""
