"""COMP's audit service: a tamper-evident log of every API request and every event."""
