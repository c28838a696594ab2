"""The COMP contract: message models, subject names, settings, telemetry, connections.

Importable, never run. Services depend on this package and never on each other.
"""
