"""Seeing what the workers do: tracing (``telemetry``), span and attribute names
(``semconv``), stage metrics (``metrics``) and structured logs (``logs``)."""
